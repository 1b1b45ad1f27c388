"""The paper-style report of a study folder (``uedist report runs/<study>``; also the end of launch/pipeline.py).

Reads the ``stage.json`` records the pipeline leaves (only the stages of the current study, listed in
``study.json``, when it exists) and writes into ``<study>/report/``:

- ``results.csv``: one row per victim run (dataset, attack, purifier, victim, mode, top-1, top-5, ...);
- ``results.md``: per dataset and mode, the papers' table: rows = attack, columns = purifier × victim, cells = clean
  test accuracy (%); or, when the study names its report ``columns`` (e.g. ``AT: none/resnet18_at``), per dataset
  one table with those columns, and with ``paper_table`` the published figure beside ours in every cell the paper
  has (``41.20 (paper 12.26)``; :mod:`uedist.app.paper_tables`), ``column`` and ``paper`` fields in the CSV;
- ``accuracy.png``: grouped bars of the same numbers; ``curves.png``: victims' training accuracy curves;
- ``grid_<dataset>_<attack>.png``: clean | poisoned | noise ×8 | each purifier's output, for a few samples;
- ``noise_<dataset>.png``: every attack's noise (stretched per image) and poisoned images, one sample per class;
- ``timing.csv`` / ``timing.md``: wall-clock per stage.
"""

from __future__ import annotations

import csv
import io
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from uedist.app.paper_tables import Cell, get_paper_table, paper_text, parse_cells
from uedist.io import atomic_write, atomic_write_bytes, atomic_write_text

RESULT_FIELDS = [
    "dataset",
    "attack",
    "purifier",
    "victim",
    "mode",
    "test_top1",
    "test_top5",
    "epochs",
    "steps",
    "train_time_s",
    "train_set",
    "run",
]
# with report columns: the column a run is shown in and the paper's figure for it
PAPER_FIELDS = [*RESULT_FIELDS[:5], "column", "test_top1", "paper", *RESULT_FIELDS[6:]]


def load_records(study_dir: Path) -> List[Dict[str, Any]]:
    """The finished stages of the study, in the study's order (from study.json when present); a record from
    before the ``noise`` kind became ``attack`` is read in the current form (:mod:`uedist.app.study_records`)."""
    from uedist.app.study_records import upgrade_record

    study_dir = Path(study_dir)
    index = study_dir / "study.json"
    if index.is_file():
        dirs = [study_dir / d for d in json.loads(index.read_text())["stages"]]
    else:
        dirs = sorted(p.parent for p in study_dir.glob("*/*/stage.json"))
    out = []
    for d in dirs:
        f = d / "stage.json"
        if f.is_file():
            rec = upgrade_record(json.loads(f.read_text()))
            rec["dir"] = str(d)
            out.append(rec)
    return out


def study_order(study_dir: Path) -> Dict[str, List[str]]:
    """The order of datasets, attacks, purifiers, victims and modes in the study's config (study.yaml), if any."""
    f = Path(study_dir) / "study.yaml"
    if not f.is_file():
        return {}
    import yaml

    c = yaml.safe_load(f.read_text()) or {}
    return {
        "dataset": list(c.get("datasets") or []),
        "attack": list(c.get("attacks") or c.get("noises") or []),  # noises: a study.yaml from before the rename
        "purifier": list(c.get("purifiers") or []),
        "victim": list(c.get("victims") or []),
        "mode": list(c.get("modes") or []),
    }


def study_columns(study_dir: Path) -> Tuple[Dict[str, List[Cell]], str]:
    """The study's report columns (name -> cells, in order) and its paper table id, from study.yaml; empty when
    the study names none."""
    f = Path(study_dir) / "study.yaml"
    if not f.is_file():
        return {}, ""
    import yaml

    c = yaml.safe_load(f.read_text()) or {}
    modes = list(c.get("modes") or ["standard"])
    cols = {name: parse_cells(spec, modes=modes) for name, spec in (c.get("columns") or {}).items()}
    return cols, str(c.get("paper_table") or "")


def sort_rows(rows: List[Dict[str, Any]], order: Dict[str, List[str]]) -> List[Dict[str, Any]]:
    def key(r: Dict[str, Any]) -> Tuple[int, ...]:
        return tuple(
            order[k].index(r[k]) if r[k] in order.get(k, []) else 10**6
            for k in ("dataset", "mode", "attack", "purifier", "victim")
        )

    return sorted(rows, key=key)


def results_rows(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for r in records:
        if r["kind"] != "victim":
            continue
        s, t = r["summary"], r["tags"]
        rows.append(
            {
                "dataset": t["dataset"],
                "attack": t["attack"],
                "purifier": t["purifier"],
                "victim": t["victim"],
                "mode": t["mode"],
                "test_top1": s.get("test_top1"),
                "test_top5": s.get("test_top5"),
                "epochs": round(float(s.get("epochs", 0)), 2),
                "steps": s.get("steps"),
                "train_time_s": round(float(s.get("train_time_s", 0)), 1),
                "train_set": r["inputs"].get("train"),
                "run": r["dir"],
            }
        )
    return rows


def _ordered(values: Sequence[str]) -> List[str]:
    return list(OrderedDict.fromkeys(values))


def results_markdown(rows: Sequence[Dict[str, Any]]) -> str:
    """Per dataset × mode: rows = attack, columns = purifier (× victim when there are several), cells = top-1 %."""
    parts = []
    for ds in _ordered([r["dataset"] for r in rows]):
        for mode in _ordered([r["mode"] for r in rows if r["dataset"] == ds]):
            sub = [r for r in rows if r["dataset"] == ds and r["mode"] == mode]
            victims = _ordered([r["victim"] for r in sub])
            cols = [(p, v) for p in _ordered([r["purifier"] for r in sub]) for v in victims]
            cell = {(r["attack"], r["purifier"], r["victim"]): r["test_top1"] for r in sub}
            head = [p if len(victims) == 1 else f"{p} · {v}" for p, v in cols]
            lines = [
                f"### {ds}, {mode} training: clean test accuracy (%)",
                "",
                "| attack | " + " | ".join(head) + " |",
                "|---|" + "---:|" * len(cols),
            ]
            for n in _ordered([r["attack"] for r in sub]):
                vals = [cell.get((n, p, v)) for p, v in cols]
                lines.append(f"| {n} | " + " | ".join("—" if x is None else f"{x:.2f}" for x in vals) + " |")
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def column_rows(
    rows: Sequence[Dict[str, Any]], columns: Dict[str, List[Cell]], *, paper_table: str = ""
) -> List[Dict[str, Any]]:
    """Each row with ``column`` (the first report column showing its cell; "" when none) and ``paper`` (the
    published figure of that attack and column as printed; "" when the paper has none)."""
    out = []
    for r in rows:
        cell = (r["purifier"], r["victim"], r["mode"])
        col = next((name for name, cells in columns.items() if cell in cells), "")
        fig = paper_text(paper_table, r["attack"], col) if paper_table and col else None
        out.append({**r, "column": col, "paper": fig or ""})
    return out


def columns_markdown(rows: Sequence[Dict[str, Any]], columns: Dict[str, List[Cell]], *, paper_table: str = "") -> str:
    """Per dataset: rows = attack, the study's report columns, cells = top-1 % (the best of a column's cells),
    with the paper's figure beside ours where the paper has one."""
    table = get_paper_table(paper_table) if paper_table else None
    parts = []
    for ds in _ordered([r["dataset"] for r in rows]):
        sub = [r for r in rows if r["dataset"] == ds]
        acc: Dict[Tuple[str, str], List[float]] = {}
        for r in sub:
            for name, cells in columns.items():
                if (r["purifier"], r["victim"], r["mode"]) in cells and r["test_top1"] is not None:
                    acc.setdefault((r["attack"], name), []).append(float(r["test_top1"]))
        title = f"### {ds}: clean test accuracy (%)" + (f", ours (paper): {table.source}" if table else "")
        lines = [title, "", "| attack | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for n in _ordered([r["attack"] for r in sub if any((r["attack"], c) in acc for c in columns)]):
            vals = []
            for c in columns:
                ours = max(acc[(n, c)]) if (n, c) in acc else None
                fig = table.text(n, c) if table else None
                vals.append(("—" if ours is None else f"{ours:.2f}") + (f" (paper {fig})" if fig else ""))
            lines.append(f"| {n} | " + " | ".join(vals) + " |")
        lines += ["", "Columns: " + "; ".join(f"{c} = {_cells_text(cells)}" for c, cells in columns.items()) + "."]
        if table:
            lines.append(f"Paper: {table.source}; {table.setting}.")
        left = sum(1 for r in sub if not any((r["purifier"], r["victim"], r["mode"]) in cs for cs in columns.values()))
        if left:
            lines.append(f"{left} victim run(s) in no column: see results.csv.")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _cells_text(cells: Sequence[Cell]) -> str:
    names = ["/".join(c) for c in cells]
    return names[0] if len(names) == 1 else "best of " + ", ".join(names)


def timing_rows(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for r in records:
        s = r["summary"]
        rows.append(
            {
                "kind": r["kind"],
                "stage": r["label"],
                "wall_s": round(float(r["wall_s"]), 1),
                "processes": r.get("world_size", 1),
                "detail": _timing_detail(s),
            }
        )
    return rows


def _timing_detail(s: Dict[str, Any]) -> str:
    t = s.get("timings")
    if isinstance(t, dict):
        return ", ".join(f"{k.replace('_s', '')} {float(v):.1f}s" for k, v in t.items())
    if "train_time_s" in s:
        return f"training {float(s['train_time_s']):.1f}s, {float(s.get('images_per_s', 0)):.0f} img/s"
    if "time_s" in s:
        return f"pass {float(s['time_s']):.1f}s"
    return ""


def _table_md(rows: Sequence[Dict[str, Any]], fields: Sequence[str]) -> str:
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(str(r[f]) for f in fields) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[Dict[str, Any]], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _save_fig(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def accuracy_plot(rows: Sequence[Dict[str, Any]], path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _ordered([(r["dataset"], r["mode"]) for r in rows])
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3.2 * len(groups)), squeeze=False)
    for ax, (ds, mode) in zip(axes[:, 0], groups):
        sub = [r for r in rows if r["dataset"] == ds and r["mode"] == mode]
        attacks = _ordered([r["attack"] for r in sub])
        series = _ordered([(r["purifier"], r["victim"]) for r in sub])
        width = 0.8 / max(len(series), 1)
        for j, (p, v) in enumerate(series):
            ys = [
                next((r["test_top1"] for r in sub if (r["attack"], r["purifier"], r["victim"]) == (n, p, v)), 0.0)
                for n in attacks
            ]
            label = p if len({s[1] for s in series}) == 1 else f"{p} · {v}"
            ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(attacks))], ys, width, label=label)
        ax.set_xticks(range(len(attacks)))
        ax.set_xticklabels(attacks)
        ax.set_ylabel("clean test top-1 (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{ds}, {mode} training")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=min(len(series), 4))
    return _save_fig(fig, path)


def curves_plot(records: Sequence[Dict[str, Any]], path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r["kind"] == "victim" and (Path(r["dir"]) / "curve.csv").is_file()]
    if not runs:
        return None
    groups = _ordered([(r["tags"]["dataset"], r["tags"]["mode"], r["tags"]["victim"]) for r in runs])
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3.2 * len(groups)), squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        for r in runs:
            t = r["tags"]
            if (t["dataset"], t["mode"], t["victim"]) != g:
                continue
            with open(Path(r["dir"]) / "curve.csv") as f:
                # evaluation rows (eval_every > 0) leave train_acc empty
                pts = [(int(row["step"]), float(row["train_acc"])) for row in csv.DictReader(f) if row.get("train_acc")]
            if pts:
                ax.plot(*zip(*pts), label=f"{t['attack']} / {t['purifier']}", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("train accuracy (%)")
        ax.set_title(f"{g[0]}, {g[1]} training, victim {g[2]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=3)
    return _save_fig(fig, path)


def image_grids(records: Sequence[Dict[str, Any]], out_dir: Path, n: int = 6) -> List[Path]:
    """Per (dataset, attack): clean | poisoned | noise ×8 | each purifier's output (same keys)."""
    from uedist.engine.purifiers.common import comparison_grid, diff_column, read_columns

    clean_of: Dict[str, str] = {}
    poisoned: Dict[Tuple[str, str], str] = OrderedDict()
    purified: Dict[Tuple[str, str], List[Tuple[str, str]]] = {}
    for r in records:
        t = r["tags"]
        if r["kind"] == "attack":
            poisoned[(t["dataset"], t["attack"])] = r["output"]
            clean_of[t["dataset"]] = r["inputs"]["train"]
        elif r["kind"] == "purify":
            purified.setdefault((t["dataset"], t["attack"]), []).append((t["purifier"], r["output"]))
            clean_of.setdefault(t["dataset"], r["inputs"].get("clean", ""))
    written = []
    for (ds, attack), pset in poisoned.items():
        sets: List[Tuple[str, Optional[Path]]] = [("clean", Path(clean_of[ds])), (attack, Path(pset))]
        sets += [(p, Path(o)) for p, o in purified.get((ds, attack), [])]
        if not all((s / "manifest.json").is_file() for _, s in sets if s is not None):
            continue
        cols = read_columns(sets, n)
        cols.insert(2, ("noise x8", diff_column(cols[1][1], cols[0][1])))
        written.append(comparison_grid(cols, out_dir / f"grid_{ds}_{attack}.png"))
    return written


def noise_figures(records: Sequence[Dict[str, Any]], out_dir: Path, n: int = 6) -> List[Path]:
    """Per dataset, the papers' noise figure (SEM Fig. 4 / 6): one sample of each of the first ``n`` classes; a
    row of clean images, then per attack a row of its noise (stretched to the full range per image) and a row of
    the poisoned images."""
    from uedist.data.grids import write_image_grid
    from uedist.engine.purifiers.common import noise_view, read_one_per_class

    clean_of: Dict[str, str] = {}
    attacks: Dict[str, List[Tuple[str, str]]] = OrderedDict()
    for r in records:
        if r["kind"] == "attack":
            t = r["tags"]
            attacks.setdefault(t["dataset"], []).append((t["attack"], r["output"]))
            clean_of[t["dataset"]] = r["inputs"]["train"]
    written = []
    for ds, sets in attacks.items():
        clean_dir = Path(clean_of[ds])
        folders = [("clean", clean_dir)] + [(a, Path(o)) for a, o in sets if Path(o) != clean_dir]
        folders = [(a, f) for a, f in folders if (f / "manifest.json").is_file()]
        if len(folders) < 2 or folders[0][0] != "clean":
            continue
        cols = read_one_per_class(folders, n)
        clean = cols[0][1]
        rows, labels = [list(clean)], ["clean"]
        for a, imgs in cols[1:]:
            rows += [list(noise_view(imgs, clean)), list(imgs)]
            labels += [f"{a} noise", a]
        written.append(write_image_grid(rows, out_dir / f"noise_{ds}.png", row_labels=labels, thumb=96))
    return written


RECORD_FILES = ("stage.json", "config.yaml", "metrics.json", "curve.csv")


def export_records(study_dir: Path, dest: Path) -> List[Path]:
    """Copy the finished stages' records (``RECORD_FILES``, kilobytes; not their shard sets or checkpoints) to
    ``dest/<kind>/<stage folder>/``: a study's results to carry to another machine or into version control. Only
    the stages ``study.json`` lists (the study as last run; its ``study.json`` and ``study.yaml`` are copied too),
    or every stage folder when there is none. Copied into ``runs/<study>/`` there, launch/pipeline.py reuses them:
    their stages are done, and a set whose readers are all done is not rebuilt. Returns the stage folders written."""
    study_dir, dest = Path(study_dir), Path(dest)
    written = []
    index = study_dir / "study.json"
    if index.is_file():  # only the stages of the study as last run: folders of older configs stay behind
        found = [study_dir / d / "stage.json" for d in json.loads(index.read_text())["stages"]]
        for name in ("study.json", "study.yaml"):  # so a report made from the copy shows that study alone
            if (study_dir / name).is_file():
                atomic_write_bytes(dest / name, (study_dir / name).read_bytes())
    else:
        found = sorted(study_dir.glob("*/*/stage.json"))
    for f in (f for f in found if f.is_file()):
        out = dest / f.parent.relative_to(study_dir)
        for name in RECORD_FILES:
            src = f.parent / name
            if src.is_file():
                atomic_write_bytes(out / name, src.read_bytes())
        written.append(out)
    return written


def write_report(study_dir: Path, out: Optional[Path] = None) -> Dict[str, Any]:
    """Write the report files; returns {what: path} (and the Markdown table as "markdown")."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise FileNotFoundError(f"no study folder {study_dir}")
    out = Path(out) if out else study_dir / "report"
    records = load_records(study_dir)
    if not records:
        raise FileNotFoundError(f"{study_dir}: no finished stages (stage.json) to report")
    rows = sort_rows(results_rows(records), study_order(study_dir))
    columns, paper_table = study_columns(study_dir)
    if columns:
        rows = column_rows(rows, columns, paper_table=paper_table)
    written: Dict[str, Any] = {}
    written["results.csv"] = atomic_write_text(
        out / "results.csv", _csv(rows, PAPER_FIELDS if columns else RESULT_FIELDS)
    )
    if not rows:
        md = "(no victim has finished yet)\n"
    else:
        md = columns_markdown(rows, columns, paper_table=paper_table) if columns else results_markdown(rows)
    written["results.md"] = atomic_write_text(out / "results.md", md)
    written["markdown"] = md
    t = timing_rows(records)
    total = sum(r["wall_s"] for r in t)
    written["timing.csv"] = atomic_write_text(
        out / "timing.csv", _csv(t, ["kind", "stage", "wall_s", "processes", "detail"])
    )
    written["timing.md"] = atomic_write_text(
        out / "timing.md",
        _table_md(t, ["kind", "stage", "wall_s", "processes", "detail"])
        + f"\nTotal {total:.1f} s over {len(t)} stages.\n",
    )
    if rows:
        written["accuracy.png"] = accuracy_plot(rows, out / "accuracy.png")
    c = curves_plot(records, out / "curves.png")
    if c:
        written["curves.png"] = c
    for g in image_grids(records, out) + noise_figures(records, out):
        written[g.name] = g
    return written
