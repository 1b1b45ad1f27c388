"""The published figures of the seed tables, as data, and how a study's report columns name its cells.

A study that reproduces a table names it (``paper_table: dvae_table2``) and its report columns (``columns:``, a
column name -> the cell(s) ``purifier/victim[/mode]`` it shows); the report then writes the paper's figure beside
ours in every cell the paper has (:mod:`uedist.app.report`). Figures are keyed by (table id, row, column): the row
is the attack name the study configs use (``clean``, ``em``, ``em_classwise``, ``tap``, ``sep``, ``ntga``, ``lsp``,
``ar``, ``ops``, ``rem``, ``sem``), the column the study's column name (``w/o``, ``AT``, ``D-VAE`` ...).

Transcribed from the papers' tables (D-VAE Tables 1, 2, 3, 4, 5, 7, 9; LE Table 1; SEM Tables 1, 2, 3, 4, 6, 8);
test accuracy (%) of a ResNet-18 unless a column names another victim (SEM Table 1 also holds hours). Each figure
is kept as printed (``13.0`` stays ``13.0``); ``–`` marks a cell the paper leaves empty. LE Table 1 and SEM Table 2
print defenses (or attacks) as rows; here they are transposed so that rows are always attacks (but SEM Table 6,
whose rows are the victim's AT radius). SEM's "SC" (shortcut) attack is LSP, row ``lsp``.

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
            "dvae_table1",
            f"{DVAE}, Table 1 (CIFAR-10 part)",
            "CIFAR-10, ResNet-18 trained on P̂ = clean + p̂ (the D-VAE's perturbation estimate), tested on the clean "
            "training set T, the test set D and the poisoned set P",
            text="""
            attack | T     | D    | P
            em     | 9.7   | 9.6  | 91.3
            rem    | 19.8  | 19.5 | 99.9
            ntga   | 29.2  | 28.6 | 99.9
            lsp    | 15.1  | 15.3 | 99.9
            ar     | 13.09 | 12.9 | 100.0
            ops    | 18.5  | 18.7 | 99.7
            """,
        ),
        _table(
            "dvae_table1_c100",
            f"{DVAE}, Table 1 (CIFAR-100 part)",
            "CIFAR-100, as the CIFAR-10 part; NTGA has no CIFAR-100 figures",
            text="""
            attack | T    | D    | P
            em     | 1.4  | 1.3  | 98.8
            rem    | 6.4  | 7.6  | 96.4
            ntga   | –    | –    | –
            lsp    | 4.2  | 4.0  | 99.1
            ar     | 1.6  | 1.6  | 100.0
            ops    | 11.2 | 10.7 | 99.5
            """,
        ),
        _table(
            "dvae_table2_arch",
            f"{DVAE}, Table 2 (the other victims, on D-VAE-purified data)",
            "CIFAR-10, D-VAE-purified training sets; victims ResNet-50, DenseNet-121, MobileNet-v2. The text "
            "misaligns these columns by one cell in the NTGA … AR rows; read as the three figures after 'Ours'",
            text="""
            attack | RN-50 | DN-121 | MN-v2
            clean  | 93.08 | 93.73  | 83.61
            ntga   | 88.96 | 89.28  | 78.72
            em     | 91.62 | 91.64  | 81.10
            tap    | 90.50 | 90.51  | 81.28
            rem    | 85.91 | 86.74  | 79.27
            sep    | 90.86 | 90.76  | 80.98
            lsp    | 90.15 | 91.10  | 80.26
            ar     | 90.53 | 90.99  | 82.26
            ops    | 88.10 | 88.78  | 81.40
            """,
        ),
        _table(
            "dvae_table3",
            f"{DVAE}, Table 3 (CIFAR-100)",
            "CIFAR-100, ResNet-18; ISS is one column here (the best of its operations)",
            text="""
            attack | w/o   | AT    | AA    | ISS   | AVATAR | LFU   | D-VAE
            clean  | 77.61 | 59.65 | 69.09 | 71.59 | 61.09  | 33.12 | 70.72
            em     | 12.30 | 59.07 | 42.89 | 61.91 | 61.09  | 29.54 | 68.79
            tap    | 13.44 | 57.91 | 35.10 | 57.33 | 60.47  | 29.90 | 65.54
            rem    | 16.80 | 59.34 | 50.12 | 58.13 | 60.90  | 31.06 | 68.52
            sep    | 4.66  | 57.93 | 27.77 | 57.76 | 59.80  | 32.03 | 64.02
            lsp    | 2.91  | 58.93 | 53.28 | 53.06 | 52.17  | 34.61 | 67.73
            ar     | 2.71  | 58.77 | 26.77 | 56.60 | 60.33  | 30.09 | 63.73
            ops    | 12.56 | 7.28  | 36.78 | 54.45 | 44.24  | 30.40 | 65.10
            """,
        ),
        _table(
            "dvae_table7",
            f"{DVAE}, Table 7 (two-stage ablation, printed with variants as rows)",
            "CIFAR-10, ResNet-18. ① without stage 1; ② without the second inference of stage 2; ③ without stage 2 "
            "(P¹); ④ without the third inference (P²); ⑤ stage 1 then the third inference with the stage-1 model",
            text="""
            attack | ①     | ②     | ③     | ④     | ⑤
            ntga   | 78.62 | 87.44 | 12.78 | 13.87 | 80.98
            em     | 91.85 | 91.18 | 78.96 | 80.77 | 83.37
            tap    | 90.97 | 90.70 | 21.12 | 23.02 | 84.14
            rem    | 82.06 | 85.21 | 25.44 | 23.84 | 83.48
            sep    | 90.76 | 90.79 | 4.83  | 5.29  | 83.32
            lsp    | 66.76 | 90.63 | 93.47 | 93.58 | 83.91
            ar     | 91.39 | 91.31 | 11.49 | 14.23 | 84.22
            ops    | 51.71 | 84.92 | 41.57 | 66.39 | 84.06
            """,
        ),
        _table(
            "dvae_table9",
            f"{DVAE}, Table 9 (partial poisoning)",
            "CIFAR-10, ResNet-18; a fraction (the poisoning ratio) of the training set poisoned; columns "
            "<defense> <ratio>",
            text="""
            attack | JPEG 0.2 | D-VAE 0.2 | JPEG 0.4 | D-VAE 0.4 | JPEG 0.6 | D-VAE 0.6 | JPEG 0.8 | D-VAE 0.8
            em     | 85.03    | 93.50     | 85.31    | 93.03     | 85.40    | 93.02     | 85.31    | 92.26
            tap    | 85.1     | 90.55     | 85.60    | 90.78     | 84.92    | 90.93     | 85.34    | 91.10
            rem    | 84.64    | 92.24     | 84.90    | 92.51     | 84.62    | 92.23     | 84.97    | 90.86
            sep    | 85.34    | 90.86     | 85.22    | 90.63     | 85.06    | 91.04     | 85.06    | 91.79
            lsp    | 85.22    | 93.20     | 85.34    | 92.85     | 84.26    | 92.16     | 83.02    | 92.16
            ar     | 85.31    | 92.77     | 85.29    | 91.83     | 85.33    | 91.41     | 84.87    | 91.70
            ops    | 85.12    | 93.15     | 84.89    | 93.29     | 84.43    | 92.13     | 83.01    | 92.16
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
            f"{SEM}, Table 3 (CIFAR-10 part, printed with architectures as rows)",
            "CIFAR-10, victim PGD adversarial training at ρa 4/255; columns are the victim architectures",
            text="""
            attack | VGG-16 | ResNet-18 | ResNet-50 | DenseNet-121 | WRN-34-10
            clean  | 87.51  | 89.51     | 89.79     | 83.27        | 91.21
            em     | 86.48  | 88.62     | 89.28     | 82.44        | 90.05
            tap    | 86.27  | 88.02     | 88.45     | 81.72        | 90.23
            ntga   | 86.65  | 88.96     | 88.79     | 80.73        | 89.95
            rem    | 65.23  | 48.16     | 40.65     | 81.48        | 48.39
            sem    | 44.37  | 31.92     | 28.89     | 77.85        | 31.42
            """,
        ),
        _table(
            "sem_table3_c100",
            f"{SEM}, Table 3 (CIFAR-100 part, printed with architectures as rows)",
            "CIFAR-100, victim PGD adversarial training at ρa 4/255; columns are the victim architectures",
            text="""
            attack | VGG-16 | ResNet-18 | ResNet-50 | DenseNet-121 | WRN-34-10
            clean  | 57.14  | 63.43     | 66.93     | 53.73        | 68.64
            em     | 56.94  | 64.17     | 66.43     | 53.52        | 68.27
            tap    | 55.24  | 62.39     | 64.44     | 52.93        | 65.80
            ntga   | 55.81  | 62.44     | 64.91     | 52.40        | 67.41
            rem    | 48.85  | 27.10     | 26.03     | 54.48        | 25.04
            sem    | 57.11  | 20.25     | 20.99     | 55.36        | 18.90
            """,
        ),
        _table(
            "sem_table2_c100",
            f"{SEM}, Table 2 (CIFAR-100 part)",
            "CIFAR-100, ResNet-18, victim PGD adversarial training at radius ρa /255 (0 = standard); SC = lsp",
            text="""
            attack | ρa=0  | ρa=1  | ρa=2  | ρa=3  | ρa=4
            clean  | 76.27 | 71.90 | 68.91 | 66.45 | 64.50
            em     | 1.60  | 71.47 | 68.49 | 65.66 | 63.43
            tap    | 13.75 | 70.03 | 66.91 | 64.30 | 62.39
            ntga   | 3.22  | 65.74 | 66.53 | 64.80 | 62.44
            lsp    | 1.51  | 70.62 | 67.95 | 65.81 | 63.30
            rem    | 1.89  | 4.47  | 7.03  | 17.55 | 27.10
            sem    | 1.95  | 3.26  | 4.35  | 9.07  | 20.25
            """,
        ),
        _table(
            "sem_table4",
            f"{SEM}, Table 4 (CIFAR-10 part)",
            "CIFAR-10, ResNet-18, noise ρu 16/255, victim AT ρa 2/255 on data passed through a 3x3 low-pass filter",
            text="""
            attack | Mean  | Median | Gaussian
            clean  | 84.25 | 87.04  | 86.78
            em     | 34.87 | 31.86  | 29.71
            tap    | 82.53 | 85.10  | 85.44
            ntga   | 40.26 | 30.87  | 41.85
            rem    | 28.60 | 27.36  | 28.70
            sem    | 23.93 | 22.00  | 21.77
            """,
        ),
        _table(
            "sem_table4_c100",
            f"{SEM}, Table 4 (CIFAR-100 part)",
            "CIFAR-100, ResNet-18, noise ρu 16/255, victim AT ρa 2/255 on data passed through a 3x3 low-pass filter",
            text="""
            attack | Mean  | Median | Gaussian
            clean  | 52.42 | 57.69  | 56.64
            em     | 53.07 | 56.35  | 56.49
            tap    | 51.30 | 55.22  | 55.19
            ntga   | 26.49 | 18.14  | 29.05
            rem    | 13.89 | 14.08  | 13.74
            sem    | 8.81  | 9.02   | 8.10
            """,
        ),
        _table(
            "sem_table1",
            f"{SEM}, Table 1 (REM / SEM variants)",
            "CIFAR-10, ResNet-18 victim with AT (ρa 4/255 as Table 2's last column: SEM 30.26 here, 31.92 there); "
            "rows: REM, REM without AT of the noise (rem_du), REM without AT of the generator (rem_theta), SEM; "
            "generation time in hours as printed (22h, 15h, 6h, 6h)",
            text="""
            attack    | time_h | Test Acc.
            rem       | 22     | 46.72
            rem_du    | 15     | 88.28
            rem_theta | 6      | 37.90
            sem       | 6      | 30.26
            """,
        ),
        _table(
            "sem_table6",
            f"{SEM}, Table 6 (ρr × ρa)",
            "CIFAR-10, ResNet-18; rows the victim's AT radius ρa, columns the SEM noise's random-perturbation radius "
            "ρr (/255); the diagonal's 11.49 / 20.91 / 31.92 equal Table 2's SEM cells",
            text="""
            attack | ρr=0  | ρr=1  | ρr=2  | ρr=3  | ρr=4
            ρa=0   | 15.87 | 11.41 | 10.42 | 16.83 | 10.52
            ρa=1   | 16.59 | 12.11 | 15.80 | 17.92 | 12.16
            ρa=2   | 64.24 | 13.44 | 11.49 | 19.13 | 21.68
            ρa=3   | 89.18 | 28.6  | 21.88 | 20.91 | 23.43
            ρa=4   | 89.30 | 67.52 | 35.63 | 62.09 | 31.92
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
