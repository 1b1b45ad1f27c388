"""The published figures of the seed tables, as data, and how a study's report columns name its cells.

A study that reproduces a table names it (``paper_table: dvae_table2``) and its report columns (``columns:``, a
column name -> the cell(s) ``purifier/victim[/mode]`` it shows); the report then writes the paper's figure beside
ours in every cell the paper has (:mod:`uedist.app.report`). Figures are keyed by (table id, row, column): the row
is the attack name the study configs use (``clean``, ``em``, ``em_classwise``, ``tap``, ``sep``, ``ntga``, ``lsp``,
``ar``, ``ops``, ``rem``, ``sem``), the column the study's column name (``w/o``, ``AT``, ``D-VAE`` ...).

Transcribed from the papers' tables (D-VAE Tables 2, 4, 5; LE Table 1; SEM Tables 2, 3, 8); test accuracy (%)
of a ResNet-18 unless a column names another victim. Each figure is kept as printed (``13.0`` stays ``13.0``);
``–`` marks a cell the paper leaves empty. LE Table 1 and SEM Table 2 print defenses (or attacks) as rows; here they
are transposed so that rows are always attacks. SEM's "SC" (shortcut) attack is LSP, row ``lsp``.

    paper_figure("dvae_table2", "em", "D-VAE")   # 91.42
    paper_text("sem_table2", "sem", "ρa=0")       # "13.0"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from uedist.config import ConfigError, require

# A report cell of a study: (purifier, victim, mode).
Cell = Tuple[str, str, str]


@dataclass(frozen=True)
class PaperTable:
    """One published table: its columns and, per row (attack), the figures as printed (``None`` for ``–``)."""

    id: str
    source: str  # paper and table, e.g. "D-VAE (Yu et al., ICML 2024), Table 2"
    setting: str  # dataset, victim, budgets
    columns: Tuple[str, ...]
    rows: Dict[str, Tuple[Optional[str], ...]]

    def text(self, row: str, column: str) -> Optional[str]:
        """The figure as printed, or None when the paper has no such cell."""
        if row not in self.rows or column not in self.columns:
            return None
        return self.rows[row][self.columns.index(column)]


def _parse(text: str) -> Tuple[Tuple[str, ...], Dict[str, Tuple[Optional[str], ...]]]:
    """A ``|``-separated block (header line first) -> (columns, {row: figures}); ``–`` -> None."""
    lines = [[c.strip() for c in ln.split("|")] for ln in text.strip().splitlines()]
    cols = tuple(lines[0][1:])
    rows: Dict[str, Tuple[Optional[str], ...]] = {}
    for cells in lines[1:]:
        if len(cells) != len(cols) + 1:
            raise ValueError(f"paper table row {cells[0]!r}: {len(cells) - 1} figures for {len(cols)} columns")
        for c in cells[1:]:
            if c != "–":
                float(c)  # a typo in a transcription fails at import
        rows[cells[0]] = tuple(None if c == "–" else c for c in cells[1:])
    return cols, rows


def _table(table_id: str, source: str, setting: str, *, text: str) -> PaperTable:
    cols, rows = _parse(text)
    return PaperTable(id=table_id, source=source, setting=setting, columns=cols, rows=rows)


DVAE = "D-VAE (Yu et al., ICML 2024)"
LE = "LE / JCDP (Jiang et al.)"
SEM = "SEM (Liu et al., AAAI 2024)"

PAPER_TABLES: Dict[str, PaperTable] = {
    t.id: t
    for t in (
        _table(
            "dvae_table2",
            f"{DVAE}, Table 2",
            "CIFAR-10, ResNet-18; ℓ∞ 8/255 (NTGA, EM, TAP, REM, SEP), ℓ2 1.0 (LSP, AR), ℓ0 1 (OPS)",
            text="""
            attack | w/o   | AT    | AA    | BDR   | Gray  | JPEG  | AVATAR | LFU   | D-VAE
            clean  | 94.57 | 85.17 | 92.27 | 88.95 | 92.74 | 85.47 | 89.61  | 86.78 | 93.29
            ntga   | 11.10 | 83.63 | 77.92 | 57.80 | 65.26 | 78.97 | 80.72  | 82.21 | 89.21
            em     | 12.26 | 84.43 | 67.11 | 81.91 | 19.50 | 85.61 | 89.54  | 65.17 | 91.42
            tap    | 25.44 | 83.89 | 55.84 | 80.18 | 21.50 | 84.99 | 89.13  | 53.46 | 90.48
            rem    | 22.43 | 86.01 | 64.99 | 32.36 | 62.35 | 84.40 | 86.06  | 33.81 | 86.38
            sep    | 6.63  | 83.48 | 61.07 | 81.21 | 8.47  | 84.97 | 89.56  | 74.14 | 90.74
            lsp    | 13.14 | 84.56 | 80.39 | 40.25 | 73.63 | 79.91 | 81.15  | 87.76 | 91.20
            ar     | 12.50 | 82.01 | 49.14 | 29.14 | 36.18 | 84.97 | 89.64  | 23.51 | 91.77
            ops    | 22.03 | 9.48  | 64.02 | 19.58 | 19.43 | 77.33 | 71.62  | 86.46 | 88.95
            """,
        ),
        _table(
            "dvae_table4",
            f"{DVAE}, Table 4",
            "ImageNet-100 subset, ResNet-18",
            text="""
            attack | w/o   | AT    | AA    | ISS   | D-VAE
            clean  | 80.52 | 55.94 | 71.56 | 76.92 | 76.78
            em     | 1.08  | 56.74 | 3.82  | 72.44 | 74.80
            tap    | 12.56 | 55.36 | 71.38 | 73.24 | 76.56
            rem    | 2.54  | 59.34 | 20.92 | 58.13 | 72.56
            lsp    | 2.50  | 58.93 | 46.58 | 53.06 | 76.06
            """,
        ),
        _table(
            "dvae_table5",
            f"{DVAE}, Table 5",
            "CIFAR-10, ResNet-18; larger budgets: ℓ∞ 16/255 (EM, TAP, REM, SEP), ℓ2 4.0 (LSP)",
            text="""
            attack | w/o   | D-VAE
            em     | 10.09 | 91.06
            tap    | 18.45 | 90.55
            rem    | 23.22 | 79.18
            sep    | 12.05 | 90.93
            lsp    | 15.45 | 86.43
            """,
        ),
        _table(
            "le_table1",
            f"{LE}, Table 1 (CIFAR-10 part; printed with defenses as rows)",
            "CIFAR-10, ResNet-18; EMN = em, REMN = rem; LE = JCDP",
            text="""
            attack       | vanilla | AVATAR | ISS  | AT   | AA   | JCDP
            clean        | 95.3    | –      | –    | –    | –    | –
            em           | 21.2    | 91.0   | 93.0 | 84.8 | 90.8 | 93.1
            em_classwise | 20.7    | –      | –    | 85.0 | –    | 94.0
            rem          | 20.5    | 88.5   | 92.8 | 49.2 | 85.5 | 92.2
            lsp          | 15.0    | 85.7   | 82.5 | 80.2 | 84.9 | 92.4
            tap          | 7.8     | 90.7   | 83.9 | 83.0 | –    | 90.8
            """,
        ),
        _table(
            "le_table1_svhn",
            f"{LE}, Table 1 (SVHN part)",
            "SVHN, ResNet-18; LE = JCDP",
            text="""
            attack | vanilla | JCDP
            clean  | 96.2    | –
            em     | 13.9    | 94.7
            rem    | 11.6    | 89.9
            lsp    | 7.3     | 93.3
            tap    | 41.0    | 94.9
            """,
        ),
        _table(
            "sem_table2",
            f"{SEM}, Table 2 (CIFAR-10 part)",
            "CIFAR-10, ResNet-18, victim PGD adversarial training at radius ρa /255 (0 = standard); SC = lsp",
            text="""
            attack | ρa=0  | ρa=1  | ρa=2  | ρa=3  | ρa=4
            clean  | 94.66 | 93.74 | 92.37 | 90.90 | 89.51
            em     | 13.20 | 22.08 | 71.43 | 87.71 | 88.62
            tap    | 22.51 | 92.16 | 90.53 | 89.55 | 88.02
            ntga   | 16.27 | 41.53 | 85.13 | 89.41 | 88.96
            lsp    | 11.63 | 91.71 | 90.42 | 86.84 | 87.26
            rem    | 15.18 | 14.28 | 25.41 | 30.85 | 48.16
            sem    | 13.0  | 12.16 | 11.49 | 20.91 | 31.92
            """,
        ),
        _table(
            "sem_table2_imagenet",
            f"{SEM}, Table 2 (ImageNet-subset part)",
            "ImageNet-100 subset, ResNet-18, victim PGD adversarial training at radius ρa /255 (0 = standard)",
            text="""
            attack | ρa=0  | ρa=1  | ρa=2  | ρa=3  | ρa=4
            clean  | 80.66 | 76.20 | 72.52 | 69.68 | 66.62
            rem    | 13.74 | 21.58 | 29.40 | 35.76 | 41.66
            sem    | 4.1   | 10.34 | 13.76 | 23.58 | 37.82
            """,
        ),
        _table(
            "sem_table3",
            f"{SEM}, Table 3 (printed with architectures as rows)",
            "CIFAR-10, victim PGD adversarial training at ρa 4/255; columns are the victim architectures",
            text="""
            attack | VGG-16 | ResNet-18 | ResNet-50
            clean  | 87.51  | 89.51     | 89.79
            em     | 86.48  | 88.62     | 89.28
            tap    | 86.27  | 88.02     | 88.45
            ntga   | 86.65  | 88.96     | 88.79
            rem    | 65.23  | 48.16     | 40.65
            sem    | 44.37  | 31.92     | 28.89
            """,
        ),
        _table(
            "sem_table8",
            f"{SEM}, Table 8 (Facescrub)",
            "Facescrub, 10 identities x 120 images, 85/15; ResNet-18, victim PGD adversarial training at radius "
            "ρa /255; SC = lsp. Damaged in the text: EM and TAP at ρa=1 print one figure (18.06) for the two "
            "rows, so both cells are left empty",
            text="""
            attack | ρa=0  | ρa=1  | ρa=2  | ρa=3  | ρa=4
            clean  | 68.89 | 63.33 | 61.11 | 53.33 | 50.56
            em     | 8.89  | –     | 18.61 | 16.39 | 19.72
            tap    | 9.72  | –     | 26.48 | 32.22 | 36.39
            lsp    | 66.11 | 66.67 | 64.72 | 57.5  | 59.44
            rem    | 10.89 | 7.89  | 11.67 | 12.22 | 11.48
            sem    | 10.56 | 7.04  | 9.44  | 10.28 | 11.11
            """,
        ),
    )
}


def get_paper_table(table: str) -> PaperTable:
    """The table ``table``; an unknown id is a ConfigError listing the known ones."""
    if table not in PAPER_TABLES:
        raise ConfigError(f"paper_table: unknown table {table!r}; known tables: {', '.join(PAPER_TABLES)}")
    return PAPER_TABLES[table]


def paper_text(table: str, row: str, column: str) -> Optional[str]:
    """The published figure of a cell as printed (``"13.0"``), or None where the paper has none."""
    return get_paper_table(table).text(row, column)


def paper_figure(table: str, row: str, column: str) -> Optional[float]:
    """The published test accuracy (%) of a cell, or None where the paper has none (an unknown table raises)."""
    t = paper_text(table, row, column)
    return None if t is None else float(t)


def parse_cells(spec: Union[str, Sequence[str]], *, modes: Sequence[str]) -> List[Cell]:
    """A report column's cells: ``"purifier/victim[/mode]"`` or a list of them (the column shows the best one,
    e.g. ISS = the better of grayscale and JPEG, as the ISS paper reports per attack). The mode defaults to the
    study's first mode."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ConfigError("a report column names at least one cell purifier/victim[/mode]")
    cells = []
    for item in items:
        parts = item.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(f"report column cell {item!r}: expected purifier/victim or purifier/victim/mode")
        cells.append((parts[0], parts[1], parts[2] if len(parts) == 3 else modes[0]))
    return cells


def validate_columns(study: Any) -> None:
    """A study's (:class:`uedist.app.pipeline.StudyConfig`) report columns name its purifiers, victims and modes;
    its paper table is known, and comes with columns and one dataset (a ConfigError naming the entry otherwise)."""
    purifiers, victims, modes = list(study.purifiers or ["none"]), list(study.victims), list(study.modes)
    for name, spec in study.columns.items():
        require(name.strip() == name and name != "", f"columns: bad column name {name!r}")
        for p, v, m in parse_cells(spec, modes=modes):
            require(p in purifiers, f"columns.{name}: no purifier {p!r}; purifiers: {', '.join(purifiers)}")
            require(v in victims, f"columns.{name}: no victim {v!r}; victims: {', '.join(victims)}")
            require(m in modes, f"columns.{name}: mode {m!r} is not in modes {modes}")
    if study.paper_table:
        get_paper_table(study.paper_table)
        require(bool(study.columns), "paper_table needs columns: (the report columns its figures are matched to)")
        require(len(study.datasets) == 1, "paper_table: a study compared with a paper table has one dataset")
