"""The identity digests of every shipped config: ``tests/test_config.py`` checks them against
``tests/scripts/config_digests.json``, so that a schema change (a field moved to a shared base, a default
redeclared) cannot silently change :func:`uedist.config.identity`, the hash of finished studies' results and of
checkpoints.

    python tests/scripts/config_digests.py > tests/scripts/config_digests.json

The committed JSON was made from commit 53a109b (a ``git worktree`` of it on PYTHONPATH), plus the random control's own
configs (configs/random/, added after it) and one deliberate change since: JCDP's ``overwrite`` became a runtime
field (it says how a rerun treats an existing set, not what is computed), so the jcdp / diffusion digests and the
studies holding such a stage were regenerated. Two groups:

- ``stage``: each ``configs/<stage>/*.yaml`` loaded as its launch script loads it (the stage's schema and fixed
  overrides), and each registered stage's defaults (``defaults/<stage>``);
- ``study``: each ``configs/pipeline/*.yaml`` expanded: the identity of every stage's resolved config (the study's
  ``set`` overrides on the stage's YAML), less the keys that name an upstream stage's output folder (their paths
  and the stage hashes follow the study's own folder policy, tested in tests/test_pipeline.py) and with dataset
  contents left out, so that the digest does not depend on which shard sets are built here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Dict
from unittest import mock

REPO = Path(__file__).resolve().parents[2]
# the launch scripts that fix the method whatever the YAML says (launch/sem.py, rem.py, em.py, dvae.py)
FIXED = ("sem", "rem", "em", "dvae")
NOT_STAGES = ("accelerate", "deepspeed", "pipeline", "shards")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def stage_digests(repo: Path = REPO) -> Dict[str, str]:
    from uedist.app.jobs import stage_method
    from uedist.app.stages import get_stage, load_stages
    from uedist.config import _read_yaml, identity, load_config
    from uedist.registry import STAGES

    load_stages()
    out: Dict[str, str] = {}
    for name in sorted(STAGES.names()):
        st = STAGES.get(name)
        cfg = dataclasses.replace(st.schema(), **dict(st.fixed))  # not validated: a purifier has no default input
        out[f"defaults/{name}"] = _digest(identity(cfg))
    for path in sorted((repo / "configs").glob("*/*.yaml")):
        kind = path.parent.name
        if kind in NOT_STAGES:
            continue
        method = kind if kind in FIXED else (stage_method(str(path), []) or kind)
        st = get_stage(method)
        over = [f"{k}={v}" for k, v in st.fixed]
        if st.kind == "purify" and not _read_yaml(path).get("data", {}).get("src"):
            over.append("data.src=poisoned")  # given on the command line (or by the study)
        cfg = load_config(st.schema, str(path), over)
        out[str(path.relative_to(repo))] = _digest(identity(cfg))
    return out


def _without(d: Dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for k in parents:
        d = d.get(k, {})
    d.pop(last, None)


def study_digests(repo: Path = REPO) -> Dict[str, str]:
    from uedist.app.pipeline import Stage, Study, StudyConfig
    from uedist.config import identity, load_config

    out: Dict[str, str] = {}
    with mock.patch("uedist.data.manifest.content_digest", lambda path: ""):
        for path in sorted((repo / "configs" / "pipeline").glob("*.yaml")):
            rows = []
            for s in Study(load_config(StudyConfig, str(path))).stages:
                d = identity(s.cfg)
                for role, key in s.runner.roles.items():
                    if isinstance(s.inputs.get(role), Stage):
                        _without(d, key)  # an upstream stage's folder: the study's path and hash policy, not ours
                rows.append((s.label, s.kind, _digest(d)))
            out[str(path.relative_to(repo))] = _digest(sorted(rows))
    return out


def all_digests(repo: Path = REPO) -> Dict[str, Dict[str, str]]:
    return {"stage": stage_digests(repo), "study": study_digests(repo)}


if __name__ == "__main__":
    json.dump(all_digests(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
