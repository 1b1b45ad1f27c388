"""Stage discovery: import every module of :mod:`uedist.engine` and of its subpackages (``attacks/``,
``purifiers/``, ``train/``; each module registers its stages with ``@stage``) and the modules named in
``UEDIST_PLUGINS`` (comma-separated import paths), so a new attack or purifier is one module plus one YAML: drop it
into ``uedist/engine/attacks/`` or ``uedist/engine/purifiers/`` (or name it in ``UEDIST_PLUGINS``) and every launch
script, the study pipeline, ``uedist stages``, the report and the registry-driven tests know it
(docs/architecture.md, "Adding a stage").
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from typing import List

from uedist.registry import STAGES, StageDef

PLUGINS_ENV = "UEDIST_PLUGINS"


def load_stages() -> None:
    """Import the engine modules and the plugins (idempotent: modules import once)."""
    import uedist.engine as engine
    import uedist.models  # noqa: F401  (registers the model zoo the stages build from)

    for info in pkgutil.walk_packages(engine.__path__, prefix="uedist.engine."):
        importlib.import_module(info.name)
    for name in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(name)


def get_stage(name: str, kind: str = "") -> StageDef:
    """The registered stage ``name`` (of ``kind`` when given); unknown names list the known ones."""
    load_stages()
    st = STAGES.get(name)
    if kind and st.kind != kind:
        from uedist.registry import RegistryError, stages_of

        raise RegistryError(
            f"{name!r} is a {st.kind} stage, not a {kind} one; {kind} stages: {', '.join(stages_of(kind))}"
        )
    return st


def stage_table() -> List[List[str]]:
    """One row per stage: name, kind, schema, inputs, output, what it is (for ``uedist stages``)."""
    load_stages()
    rows = []
    for n in STAGES.names():
        st = STAGES.get(n)
        rows.append(
            [n, st.kind, f"{st.schema.__module__}.{st.schema.__name__}", ", ".join(st.inputs), st.output or "-", st.doc]
        )
    return sorted(rows, key=lambda r: (r[1], r[0]))
