"""A study folder's records across the rename of the stage kind ``noise`` to ``attack``.

Before the rename a study kept its poisoned sets in ``<study>/noise/<label>-<hash>/``, and each ``stage.json`` said
``"kind": "noise"``, tagged its attack ``"noise": <name>`` and named paths through ``<study>/noise/``. Stage hashes
keep the old kind's name (:data:`uedist.app.pipeline._HASH_KIND`), so such records stay valid; only their place
and wording change. :func:`migrate_study` moves and rewrites them in place (idempotent: a migrated or new folder is
left as it is), for ``uedist report <study> --migrate``, for ``launch/pipeline.py`` (which migrates the folder it
runs in first) and for carried records (``docs/results/<study>/stages``). :func:`upgrade_record` reads an old
record in the new form without touching the file (the report of a folder not yet migrated).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from uedist.io import atomic_write_json, atomic_write_text

RENAMED_KINDS = {"noise": "attack"}  # stage kind (and its folder and tag): old -> new
# the stage folder's small text files that name paths (stage.json is rewritten field by field)
TEXT_RECORDS = ("config.yaml", "metrics.json", "curve.csv")


def legacy_stage_folders(study_dir: Path) -> List[Path]:
    """The stage folders of ``study_dir`` still under an old kind's folder (``noise/``)."""
    return sorted(p for old in RENAMED_KINDS for p in (Path(study_dir) / old).glob("*") if p.is_dir())


def _study_base(rec: Dict[str, Any]) -> Optional[str]:
    """The study folder a record was written in: its config's ``run_root`` is ``<study>/<kind>``."""
    root = (rec.get("config") or {}).get("run_root")
    return str(Path(root).parent) if isinstance(root, str) and root else None


def _path_fix(base: Optional[str]) -> Callable[[str], str]:
    """A function renaming ``<base>/noise`` (as a path prefix) to ``<base>/attack`` in a string; identity when the
    record names no study folder."""
    if not base:
        return lambda text: text
    subs = [
        (re.compile(r"(?<![\w.-])" + re.escape(f"{base}/{old}") + r"(?=[/\"'\s,]|$)", re.M), f"{base}/{new}")
        for old, new in RENAMED_KINDS.items()
    ]

    def fix(text: str) -> str:
        for pat, new in subs:
            text = pat.sub(new, text)
        return text

    return fix


def upgrade_record(rec: Dict[str, Any]) -> Dict[str, Any]:
    """A ``stage.json`` record in the current form: the kind renamed, the tag renamed (in place, keeping the
    order), and every path through the study's old kind folder pointing into the new one. A current record comes
    back equal."""
    fix = _path_fix(_study_base(rec))

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return fix(x)
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    out = {k: (v if k in ("kind", "tags") else walk(v)) for k, v in rec.items()}
    if isinstance(rec.get("kind"), str):
        out["kind"] = RENAMED_KINDS.get(rec["kind"], rec["kind"])
    if isinstance(rec.get("tags"), dict):
        out["tags"] = {RENAMED_KINDS.get(k, k): v for k, v in rec["tags"].items()}
    return out


def _migrate_stage_folder(folder: Path) -> bool:
    """Rewrite one stage folder's records in the current form; whether anything changed."""
    f = folder / "stage.json"
    if not f.is_file():
        return False
    rec = json.loads(f.read_text())
    new = upgrade_record(rec)
    changed = new != rec
    if changed:
        atomic_write_json(f, new)
    fix = _path_fix(_study_base(rec))
    for name in TEXT_RECORDS:
        g = folder / name
        if g.is_file():
            text = g.read_text()
            if fix(text) != text:
                atomic_write_text(g, fix(text))
                changed = True
    return changed


def migrate_study(study_dir: Path) -> int:
    """Migrate a study folder (or a folder of carried records, ``<kind>/<stage>/``) from before the rename of the
    ``noise`` kind: move ``noise/<stage>`` to ``attack/<stage>`` (a stage already there is kept and the old one
    left in place), rewrite every ``stage.json`` and the paths in its ``config.yaml`` / ``metrics.json``, the stage
    list ``study.json`` and the ``noises:`` key of ``study.yaml``. Idempotent. Returns the number of stage folders
    moved or rewritten."""
    study_dir = Path(study_dir)
    moved = set()
    for old_dir in legacy_stage_folders(study_dir):
        new_dir = study_dir / RENAMED_KINDS[old_dir.parent.name] / old_dir.name
        if not new_dir.exists():
            new_dir.parent.mkdir(parents=True, exist_ok=True)
            old_dir.rename(new_dir)
            moved.add(new_dir)
    for old in RENAMED_KINDS:
        if (study_dir / old).is_dir() and not any((study_dir / old).iterdir()):
            (study_dir / old).rmdir()
    rewritten = {
        f.parent
        for f in sorted(study_dir.glob("*/*/stage.json"))
        if f.parent.parent.name not in RENAMED_KINDS and _migrate_stage_folder(f.parent)
    }
    _migrate_study_files(study_dir)
    return len(moved | rewritten)


def _migrate_study_files(study_dir: Path) -> None:
    index = study_dir / "study.json"
    if index.is_file():
        d = json.loads(index.read_text())
        stages = [_renamed_stage_path(s) for s in d.get("stages", [])]
        if stages != d.get("stages", []):
            atomic_write_json(index, {**d, "stages": stages})
    cfg = study_dir / "study.yaml"
    if cfg.is_file():
        text = cfg.read_text()
        new = re.sub(r"^noises:", "attacks:", text, flags=re.M)
        if new != text:
            atomic_write_text(cfg, new)


def _renamed_stage_path(s: str) -> str:
    kind, _, rest = s.partition("/")
    return f"{RENAMED_KINDS.get(kind, kind)}/{rest}" if rest else s
