"""Stage discovery: import every module of :mod:`uedist.engine` and of its subpackages (``attacks/``,
``purifiers/``, ``train/``; each module registers its stages with ``@stage``) and the modules named in
``UEDIST_PLUGINS`` (comma-separated import paths), so a new attack or purifier is one module plus one YAML: drop it
into ``uedist/engine/attacks/`` or ``uedist/engine/purifiers/`` (or name it in ``UEDIST_PLUGINS``) and every launch
script, the study pipeline, ``uedist stages``, the report and the registry-driven tests know it
(docs/architecture.md, "Adding a stage").
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from uedist.config import LOCATION, MAX, RANGE, RUNTIME, config_to_dict
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


# ------------------------------------------------------------------------------------------ one stage's config keys
def describe_stage(name: str) -> str:
    """``uedist stages NAME``: the stage in two lines, then every key of its config schema (a nested section's own
    row, then its keys, dotted) as a Markdown table: type; default (the schema's, a factory's for a section, the
    stage's ``fixed`` values marked); range (a ``Literal``'s choices and the conditions the schema's ``validate()``
    puts on that key alone, else the loader's rule for numbers: >= 0, or > 0 where declared positive); one line of
    help (the comment beside the field in the source, else the comment block above it, else its class docstring).
    An unknown name raises :class:`uedist.registry.RegistryError` listing the known stages."""
    st = get_stage(name)
    fixed = dict(st.fixed)
    head = (
        f"{st.name} ({st.kind} stage): {st.doc or '-'}\n"
        f"config schema {st.schema.__module__}.{st.schema.__name__}; inputs {', '.join(st.inputs) or '-'}; "
        f"output {st.output or '-'}\n[runtime] keys change how a job runs (a killed job rerun with another value "
        "resumes), [location] keys where it writes; neither changes what it computes"
    )
    lines = ["| key | type | default | range | help |", "|---|---|---|---|---|"]
    for key, tp, default, rng, text in schema_rows(st.schema):
        shown = f"{_show(fixed[key])} (fixed)" if key in fixed else default
        lines.append("| " + " | ".join(c.replace("|", "\\|") or "-" for c in (key, tp, shown, rng, text)) + " |")
    return head + "\n\n" + "\n".join(lines)


Row = Tuple[str, str, str, str, str]


def schema_rows(
    cls: type, prefix: str = "", instance: Any = None, outer: Optional[Dict[str, List[str]]] = None
) -> List[Row]:
    """(key, type, default, range, help) of every field of the dataclass ``cls``. ``instance``: a section's default
    object (its factory may set other defaults than the section class has); ``outer``: conditions an enclosing
    schema's ``validate()`` puts on this section's keys (``data.batch_size >= 1``), relative to it."""
    hints, rows = typing.get_type_hints(cls), []
    conds = _validate_conditions(cls)
    for k, v in (outer or {}).items():
        conds.setdefault(k, []).extend(v)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        value = getattr(instance, f.name) if instance is not None else _field_default(f)
        text = _field_help(cls, f.name)
        if dataclasses.is_dataclass(tp):
            rows.append((key, "section", "", "", text or (_sentences(_class_doc(tp)) or [""])[0]))
            inner = {k.split(".", 1)[1]: v for k, v in conds.items() if k.startswith(f"{f.name}.")}
            rows += schema_rows(tp, f"{key}.", None if value is dataclasses.MISSING else value, inner)
            continue
        choices = (
            [f"one of {', '.join(map(str, typing.get_args(tp)))}"] if typing.get_origin(tp) is typing.Literal else []
        )
        rng = "; ".join([*choices, *conds.get(f.name, [])]) or _loader_range(f, tp)
        tags = [t for t, m in (("runtime", RUNTIME), ("location", LOCATION)) if f.metadata.get(m)]
        text = f"[{', '.join(tags)}] {text}".strip() if tags else text
        rows.append((key, _type_text(tp), "required" if value is dataclasses.MISSING else _show(value), rng, text))
    return rows


def _field_default(f: "dataclasses.Field[Any]") -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def _show(value: Any) -> str:
    """A default as it would be written in a YAML config (``null``, ``true``, ``[0.4, 0.8]``, ``''``)."""
    plain = json.loads(json.dumps(value, default=str))
    return yaml.safe_dump(plain, default_flow_style=True, width=10**6).split("\n...")[0].strip()


def _type_text(tp: Any) -> str:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " or ".join(sorted({type(a).__name__ for a in args}))
    if origin is typing.Union:
        return " or ".join(_type_text(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else ""
        )
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_text(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _numeric(tp: Any) -> bool:
    return tp in (int, float) or any(_numeric(a) for a in typing.get_args(tp))


def _loader_range(f: "dataclasses.Field[Any]", tp: Any) -> str:
    """What the loader checks on every number of a schema (uedist.config): >= 0 unless signed, > 0 if positive."""
    if not _numeric(tp):
        return ""
    rng = f.metadata.get(RANGE, (0, True))
    parts = [] if rng is None else [f"{'>=' if rng[1] else '>'} {rng[0]}"]
    return ", ".join(parts + ([f"<= {f.metadata[MAX]}"] if MAX in f.metadata else []))


def _validate_conditions(cls: type) -> Dict[str, List[str]]:
    """{dotted key: conditions} from the ``require(cond, ...)`` statements at the top of each ``validate()`` of
    ``cls`` and its bases: each ``and``-part of ``cond`` that reads exactly one field (``0 < self.budget <= 64``
    gives ``budget``'s ``0 < budget <= 64``). A ``require`` under an ``if`` holds only sometimes and is left out."""
    out: Dict[str, List[str]] = {}
    for klass in reversed(cls.__mro__):
        fn = klass.__dict__.get("validate")
        tree = _parsed(fn)
        for node in tree.body[0].body if tree is not None else []:  # type: ignore[attr-defined]
            call = node.value if isinstance(node, ast.Expr) else None
            if not (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "require" and call.args):
                continue
            cond = call.args[0]
            for part in cond.values if isinstance(cond, ast.BoolOp) and isinstance(cond.op, ast.And) else [cond]:
                keys = _self_keys(part)
                text = ast.unparse(part).replace("self.", "")
                if len(keys) == 1 and text not in out.get(keys[0], []):
                    out.setdefault(keys[0], []).append(text)
    return out


def _parsed(obj: Any) -> Optional[ast.Module]:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(obj)))
    except (OSError, TypeError, SyntaxError):
        return None


def _self_keys(node: ast.AST) -> List[str]:
    """The dotted ``self.a.b`` chains an expression reads, the longest of each (``self.data.batch_size``: one)."""
    chains = set()
    for n in ast.walk(node):
        parts = []
        while isinstance(n, ast.Attribute):
            parts.insert(0, n.attr)
            n = n.value
        if parts and isinstance(n, ast.Name) and n.id == "self":
            chains.add(".".join(parts))
    return sorted(c for c in chains if not any(o.startswith(c + ".") for o in chains))


def _field_help(cls: type, name: str) -> str:
    """One line about field ``name``: the comment at its declaration (the newest in the MRO: a redeclaration wins,
    else an older one), else a docstring sentence of a declaring class that names it, else the first sentence of
    the docstring of the class that first declares it, when that class declares at most three fields (``Cadence``,
    ``Seeded``: a small base's docstring is about its fields)."""
    owners = [k for k in cls.__mro__ if name in inspect.get_annotations(k)]
    for klass in owners:
        if _comments(klass).get(name):
            return _comments(klass)[name]
    for klass in owners:
        sentences = _sentences(_class_doc(klass))
        hit = [s for s in sentences if re.search(rf"``[^`]*\b{re.escape(name)}\b[^`]*``", s)]
        if hit:
            return hit[0]
    first = _sentences(_class_doc(owners[-1])) if owners and len(inspect.get_annotations(owners[-1])) <= 3 else []
    return first[0] if first else ""


def _class_doc(klass: type) -> str:
    doc = klass.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{klass.__name__}(") else doc  # not dataclass's generated signature


def _sentences(text: Optional[str]) -> List[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z(`])", " ".join((text or "").split())) if s.strip()]


@functools.lru_cache(maxsize=None)
def _comments(klass: type) -> Dict[str, str]:
    """{field: its comment} in the source of ``klass``: the comment on the field's lines, else the first sentence
    of the comment block right above it."""
    try:
        src = textwrap.dedent("".join(inspect.getsourcelines(klass)[0]))
        notes = {
            t.start[0]: t.string.lstrip("#").strip()
            for t in tokenize.generate_tokens(io.StringIO(src).readline)
            if t.type == tokenize.COMMENT
        }
        body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    lines, out = src.splitlines(), {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        beside = [notes[i] for i in range(node.lineno, (node.end_lineno or node.lineno) + 1) if i in notes]
        above, i = [], node.lineno - 1
        while i in notes and lines[i - 1].lstrip().startswith("#"):
            above.insert(0, notes[i])
            i -= 1
        out[node.target.id] = " ".join(beside) or (_sentences(" ".join(above)) or [""])[0]
    return out


# ------------------------------------------------------------------------------------------------- --print-config
PRINT_CONFIG = "--print-config"
PRINT_CONFIG_HELP = (
    f"{PRINT_CONFIG}: print the resolved config (defaults, then --config and its base: chain, then key=value)\n"
    "as YAML and exit 0; nothing runs and nothing is written"
)


def stage_main(kind: str, argv: Optional[List[str]] = None, **how: Any) -> int:
    """A launch script's ``main``: :func:`uedist.app.jobs.run_stage_main` (same keywords), or with
    ``--print-config`` anywhere on the command line the config that run would use, as YAML on stdout."""
    from uedist.app.jobs import run_stage_main

    args = list(sys.argv[1:] if argv is None else argv)
    how["doc"] = f"{(how.get('doc') or '').rstrip()}\n\n{PRINT_CONFIG_HELP}"
    if PRINT_CONFIG not in args:
        return run_stage_main(kind, args, **how)
    args.remove(PRINT_CONFIG)
    return print_stage_config(kind, args, **how)


def print_stage_config(
    kind: str,
    argv: Sequence[str],
    *,
    doc: Optional[str] = None,
    method: Optional[str] = None,
    default_method: str = "",
    default_config: Optional[str] = None,
) -> int:
    """Resolve a command line as :func:`uedist.app.jobs.run_stage_main` does (the stage: ``method=``, the script's
    method, the config's, ``default_method``; its ``fixed`` values last) and write the config as YAML; a bad key,
    value or method exits 2 with the message, as the job would."""
    from uedist.app.jobs import REPO, _parse, stage_method
    from uedist.config import ConfigError, load_config
    from uedist.registry import RegistryError, stages_of

    default = str(REPO / default_config) if default_config and not Path(default_config).is_file() else default_config
    p, args = _parse(list(argv), doc=doc, config_dir="configs/", example="name=my_run", default_config=default)
    path = args.config or default
    try:
        name = stage_method(None, args.overrides) or method or stage_method(path, []) or default_method
        if not name:
            p.error(f"say which {kind} method: method=<name>; {kind} methods: {', '.join(stages_of(kind))}")
        st = get_stage(name, kind)
        cfg = load_config(st.schema, path, [*args.overrides, *(f"{k}={v}" for k, v in st.fixed)])
    except (ConfigError, RegistryError) as e:
        p.error(str(e))
    return print_config(cfg)


def print_config(cfg: Any) -> int:
    """Write a resolved config to stdout as the YAML ``save_config`` writes (``load_config`` reads it back to the
    same config); returns 0."""
    sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    sys.stdout.flush()
    return 0
