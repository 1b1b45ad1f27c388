"""The seed tables' published figures (uedist.app.paper_tables), the study configs that reproduce them (every
configs/pipeline/*.yaml loads strictly, as launch/pipeline.py loads it, and its report columns cover its cells),
and the report with a paper table on a fake study folder."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from uedist.app.paper_tables import PAPER_TABLES, get_paper_table, paper_figure, paper_text, parse_cells
from uedist.app.pipeline import Study, load_study
from uedist.app.report import results_markdown, results_rows, write_report
from uedist.config import ConfigError

STUDIES = sorted((REPO / "configs/pipeline").glob("*.yaml"))
# the attack stages being written beside this work: a study naming one whose config (or stage) does not exist yet
# is skipped, not failed
# paper columns a study has no column for, because the method is not built
NOT_BUILT = {"AVATAR", "LFU"}


# ------------------------------------------------------------------------------------------------- the figures
def test_published_figures_of_reference_md():
    """REFERENCE.md's "Published figures" summary, looked up cell by cell."""
    expect = {
        ("sem_table2", "clean", "ρa=0"): 94.66,
        ("sem_table2", "em", "ρa=0"): 13.20,
        ("sem_table2", "rem", "ρa=0"): 15.18,
        ("sem_table2", "sem", "ρa=0"): 13.0,
        ("sem_table2", "clean", "ρa=4"): 89.51,
        ("sem_table2", "em", "ρa=4"): 88.62,
        ("sem_table2", "rem", "ρa=4"): 48.16,
        ("sem_table2", "sem", "ρa=4"): 31.92,
        ("sem_table2_imagenet", "clean", "ρa=4"): 66.62,
        ("sem_table2_imagenet", "rem", "ρa=4"): 41.66,
        ("sem_table2_imagenet", "sem", "ρa=4"): 37.82,
        ("dvae_table2", "clean", "w/o"): 94.57,
        ("dvae_table2", "em", "w/o"): 12.26,
        ("dvae_table2", "rem", "w/o"): 22.43,
        ("dvae_table2", "em", "D-VAE"): 91.42,
        ("dvae_table2", "rem", "D-VAE"): 86.38,
        ("dvae_table2", "em", "JPEG"): 85.61,
        ("dvae_table4", "clean", "w/o"): 80.52,
        ("dvae_table4", "em", "w/o"): 1.08,
        ("dvae_table4", "rem", "w/o"): 2.54,
        ("dvae_table4", "em", "D-VAE"): 74.80,
        ("dvae_table4", "rem", "D-VAE"): 72.56,
        ("le_table1", "clean", "vanilla"): 95.3,
        ("le_table1", "em", "vanilla"): 21.2,
        ("le_table1", "rem", "vanilla"): 20.5,
        ("le_table1", "em", "JCDP"): 93.1,
        ("le_table1", "rem", "JCDP"): 92.2,
    }
    for (table, row, col), v in expect.items():
        assert paper_figure(table, row, col) == v, (table, row, col)


def test_full_tables_shape_and_spot_figures():
    sizes = {
        "dvae_table2": (9, 9),
        "dvae_table4": (5, 5),
        "dvae_table5": (5, 2),
        "le_table1": (6, 6),
        "le_table1_svhn": (5, 2),
        "sem_table2": (7, 5),
        "sem_table2_imagenet": (3, 5),
        "sem_table3": (6, 5),
        "sem_table8": (6, 5),
        "dvae_table1": (6, 3),
        "dvae_table1_c100": (6, 3),
        "dvae_table2_arch": (9, 3),
        "dvae_table3": (8, 7),
        "dvae_table7": (8, 5),
        "dvae_table9": (7, 8),
        "sem_table1": (4, 2),
        "sem_table2_c100": (7, 5),
        "sem_table3_c100": (6, 5),
        "sem_table4": (6, 3),
        "sem_table4_c100": (6, 3),
        "sem_table6": (5, 5),
    }
    assert {k: (len(t.rows), len(t.columns)) for k, t in PAPER_TABLES.items()} == sizes
    assert paper_figure("dvae_table2", "ops", "AT") == 9.48 and paper_figure("dvae_table2", "ar", "LFU") == 23.51
    assert paper_figure("dvae_table5", "lsp", "D-VAE") == 86.43 and paper_figure("dvae_table4", "lsp", "AA") == 46.58
    assert paper_figure("le_table1", "tap", "AA") is None  # "–" in the paper
    assert paper_figure("le_table1", "em_classwise", "AT") == 85.0
    assert paper_figure("le_table1_svhn", "tap", "vanilla") == 41.0
    assert paper_figure("sem_table2", "lsp", "ρa=1") == 91.71  # SEM's "SC"
    assert (
        paper_figure("sem_table3", "sem", "VGG-16") == 44.37 and paper_figure("sem_table3", "rem", "ResNet-50") == 40.65
    )
    assert paper_text("sem_table2_imagenet", "sem", "ρa=0") == "4.1"  # kept as printed
    assert paper_figure("sem_table8", "sem", "ρa=1") == 7.04 and paper_figure("sem_table8", "tap", "ρa=4") == 36.39
    assert paper_figure("sem_table8", "em", "ρa=1") is None  # the damaged merged EM / TAP cell
    assert (
        paper_figure("sem_table3", "sem", "WRN-34-10") == 31.42
        and paper_figure("sem_table3_c100", "rem", "VGG-16") == 48.85
    )
    assert paper_figure("dvae_table7", "lsp", "③") == 93.47 and paper_figure("dvae_table9", "ops", "JPEG 0.8") == 83.01
    assert (
        paper_figure("dvae_table2_arch", "ntga", "MN-v2") == 78.72 and paper_figure("dvae_table3", "ops", "AT") == 7.28
    )
    assert paper_figure("dvae_table1_c100", "ntga", "P") is None and paper_figure("dvae_table1", "ar", "T") == 13.09
    assert paper_figure("sem_table6", "ρa=3", "ρr=3") == paper_figure("sem_table2", "sem", "ρa=3") == 20.91
    assert paper_figure("sem_table2_c100", "sem", "ρa=4") == paper_figure("sem_table3_c100", "sem", "ResNet-18")
    assert paper_figure("dvae_table2", "sem", "w/o") is None and paper_figure("dvae_table2", "em", "ISS") is None
    with pytest.raises(ConfigError, match="known tables: dvae_table2"):
        get_paper_table("dvae_table6")


def test_parse_cells():
    assert parse_cells("none/r18", modes=["standard"]) == [("none", "r18", "standard")]
    assert parse_cells(["gray/r18/adversarial", "jpeg/r18"], modes=["standard", "adversarial"]) == [
        ("gray", "r18", "adversarial"),
        ("jpeg", "r18", "standard"),
    ]
    for bad in ("none", "none/r18/standard/x", "/r18", []):
        with pytest.raises(ConfigError):
            parse_cells(bad, modes=["standard"])


# ---------------------------------------------------------------------------------------- the study configs
def _check_study(study, raw):
    """Every report column cell has a victim stage, and every victim stage is in a column (no run wasted)."""
    victims = [s for s in study.stages if s.kind == "victim"]
    assert victims
    cols = {k: parse_cells(v, modes=study.cfg.modes) for k, v in (raw.get("columns") or {}).items()}
    if not cols:
        return
    have = {(s.tags["purifier"], s.tags["victim"], s.tags["mode"]) for s in victims}
    for name, cells in cols.items():
        assert all(c in have for c in cells), f"column {name}: {cells} has no victim stage"
    shown = {c for cells in cols.values() for c in cells}
    assert have <= shown, f"victim runs in no column: {sorted(have - shown)}"


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_study_config_loads(path, tmp_path, monkeypatch):
    """The launch script's own loader, strict, then the stage expansion (every stage's YAML and overrides)."""
    monkeypatch.chdir(REPO)
    raw = yaml.safe_load(path.read_text())
    cfg = load_study(str(path), [])
    _check_study(Study(cfg, root=tmp_path / cfg.name), raw)


@pytest.mark.parametrize(
    "path", [p for p in STUDIES if yaml.safe_load(p.read_text()).get("paper_table")], ids=lambda p: p.stem
)
def test_study_matches_its_paper_table(path):
    """A study with a paper table has an attack for every row and a column for every column the paper has (but the
    methods not built), so every published figure of the table is shown."""
    raw = yaml.safe_load(path.read_text())
    table = get_paper_table(raw["paper_table"])
    assert set(table.rows) <= set(raw["attacks"]), f"rows without an attack: {set(table.rows) - set(raw['attacks'])}"
    missing = set(table.columns) - set(raw["columns"]) - NOT_BUILT
    assert not missing, f"paper columns the study does not show: {missing}"
    header = path.read_text().split("\nname:")[0]
    assert header.startswith("# ") and "launch/pipeline.py --config configs/pipeline/" + path.name in header
    for col in set(table.columns) & NOT_BUILT:
        assert col in header, f"the header should say that {col} is not reproduced"


def test_study_config_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = REPO / "configs/pipeline/cpu_sem_table.yaml"  # a shipped study without columns
    with pytest.raises(ConfigError, match="paper_table needs columns"):
        load_study(str(path), ["paper_table=sem_table2"])
    with pytest.raises(ConfigError, match="unknown table 'sem_table9'"):
        load_study(str(path), ["paper_table=sem_table9", "columns={AT: none/resnet18/adversarial}"])
    with pytest.raises(ConfigError, match="no victim 'r50'"):
        load_study(str(path), ["columns={AT: none/r50}"])
    with pytest.raises(ConfigError, match="no purifier 'dvae'"):
        load_study(str(path), ["columns={D-VAE: dvae/resnet18}"])
    with pytest.raises(ConfigError, match="mode 'adv' is not in modes"):
        load_study(str(path), ["columns={AT: [none/resnet18/adv]}"])
    cfg = load_study(
        str(path), ["paper_table=sem_table2", "columns={ρa=0: none/resnet18, ρa=4: none/resnet18/adversarial}"]
    )
    assert cfg.columns == {"ρa=0": "none/resnet18", "ρa=4": "none/resnet18/adversarial"}


# ---------------------------------------------------------------------------------------------------- the report
def _fake_study(root: Path, *, columns=None, paper_table="", cells=()):
    """A study folder with study.yaml and one finished victim stage.json per (attack, purifier, victim, top1), written
    in the layout before the rename (tag "noise"), which the report still reads."""
    study = {
        "name": "fake",
        "datasets": {"cifar10": {"train": "t", "test": "s"}},
        "attacks": {"clean": {}, "em": {}, "rem": {}},
        "purifiers": {"none": {}, "grayscale": {}, "jpeg10": {}, "dvae": {}},
        "victims": {"r18": {}, "r18_at": {}},
        "modes": ["standard"],
    }
    if columns:
        study["columns"] = columns
    if paper_table:
        study["paper_table"] = paper_table
    root.mkdir(parents=True)
    (root / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False, allow_unicode=True))
    for i, (noise, purifier, victim, top1) in enumerate(cells):
        d = root / "victim" / f"cifar10.{noise}.{purifier}.{victim}.standard-{i:04d}"
        d.mkdir(parents=True)
        tags = {"dataset": "cifar10", "noise": noise, "purifier": purifier, "victim": victim, "mode": "standard"}
        rec = {
            "kind": "victim",
            "label": d.name[:-5],
            "hash": f"{i:04d}",
            "tags": tags,
            "wall_s": 1.0,
            "inputs": {"train": "x", "test": "s"},
            "summary": {"test_top1": top1, "test_top5": 99.0, "epochs": 1, "steps": 10, "train_time_s": 1.0},
        }
        (d / "stage.json").write_text(json.dumps(rec))
    return root


CELLS = [
    ("clean", "none", "r18", 90.0),
    ("clean", "none", "r18_at", 80.0),
    ("em", "none", "r18", 41.2),
    ("em", "none", "r18_at", 82.5),
    ("em", "grayscale", "r18", 30.0),
    ("em", "jpeg10", "r18", 70.0),
    ("em", "dvae", "r18", 88.125),
    ("rem", "none", "r18", 25.0),
]
COLUMNS = {
    "w/o": "none/r18",
    "AT": "none/r18_at",
    "ISS": ["grayscale/r18", "jpeg10/r18"],
    "D-VAE": "dvae/r18",
    "extra": "dvae/r18_at",
}


def test_report_with_paper_table(tmp_path):
    study = _fake_study(tmp_path / "fake", columns=COLUMNS, paper_table="dvae_table4", cells=CELLS)
    written = write_report(study)
    md = (study / "report/results.md").read_text()
    assert md == written["markdown"]
    assert "### cifar10: clean test accuracy (%), ours (paper): D-VAE (Yu et al., ICML 2024), Table 4" in md
    assert "| attack | w/o | AT | ISS | D-VAE | extra |" in md
    assert "| clean | 90.00 (paper 80.52) | 80.00 (paper 55.94) | — (paper 76.92) | — (paper 76.78) | — |" in md
    # ISS: the better of grayscale (30.0) and JPEG (70.0); a column the paper lacks gets no figure
    assert "| em | 41.20 (paper 1.08) | 82.50 (paper 56.74) | 70.00 (paper 72.44) | 88.12 (paper 74.80) | — |" in md
    assert "| rem | 25.00 (paper 2.54) | — (paper 59.34) | — (paper 58.13) | — (paper 72.56) | — |" in md
    assert "ISS = best of grayscale/r18/standard, jpeg10/r18/standard" in md and "Paper: D-VAE" in md
    rows = list(csv.DictReader(open(study / "report/results.csv")))
    assert list(rows[0])[:8] == ["dataset", "attack", "purifier", "victim", "mode", "column", "test_top1", "paper"]
    by = {(r["attack"], r["purifier"], r["victim"]): (r["column"], r["paper"]) for r in rows}
    assert by[("em", "none", "r18")] == ("w/o", "1.08")
    assert by[("em", "grayscale", "r18")] == by[("em", "jpeg10", "r18")] == ("ISS", "72.44")
    assert by[("clean", "none", "r18_at")] == ("AT", "55.94") and len(rows) == len(CELLS)


def test_report_columns_without_paper_table(tmp_path):
    cells = [*CELLS, ("rem", "grayscale", "r18_at", 12.0)]  # in no column
    study = _fake_study(tmp_path / "fake", columns={"w/o": "none/r18", "D-VAE": "dvae/r18"}, cells=cells)
    md = write_report(study)["markdown"]
    assert "| attack | w/o | D-VAE |" in md and "(paper" not in md and "Paper:" not in md
    assert "| em | 41.20 | 88.12 |" in md and "| rem | 25.00 | — |" in md
    assert "5 victim run(s) in no column" in md  # the AT, gray, JPEG and extra runs
    rows = list(csv.DictReader(open(study / "report/results.csv")))
    assert {r["paper"] for r in rows} == {""} and {r["column"] for r in rows} == {"", "w/o", "D-VAE"}


def test_report_unchanged_without_columns(tmp_path):
    """No columns and no paper table: the report is the per-mode purifier × victim table it always was."""
    from uedist.app.report import RESULT_FIELDS, load_records, sort_rows, study_order

    study = _fake_study(tmp_path / "fake", cells=CELLS)
    md = write_report(study)["markdown"]
    rows = sort_rows(results_rows(load_records(study)), study_order(study))
    assert md == results_markdown(rows)
    assert "### cifar10, standard training: clean test accuracy (%)" in md and "none · r18_at" in md
    assert "paper" not in md
    assert list(csv.DictReader(open(study / "report/results.csv")))[0].keys() == set(RESULT_FIELDS)
