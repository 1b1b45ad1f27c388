"""Strict structured configs: dataclass schemas, ``--config FILE`` then ``key=value`` overrides.

    cfg = load_config(BuildConfig, "configs/shards/cifar10.yaml", ["shard_size=500", "synthetic.num_classes=20"])

- An unknown key (in the file or an override) is an error naming its dotted path, with the closest known key.
- A wrong type is an error naming the key, the expected type and the value (``eps: "8"`` is not an int;
  ``true`` is not an int; an int is accepted where a float is expected).
- Nested dataclasses are nested YAML mappings; overrides address them with dots (``source.size=64``).
- ``Literal[...]`` fields accept only their choices; ``Optional[X]`` accepts ``null``.
- A schema may define ``validate(self)`` (called after loading, recursively) for range checks.
- ``base: other.yaml`` at the top of a YAML (a path relative to that file) loads the other file first and merges
  this one over it, so a variant holds only what differs. Bases chain; a cycle is an error.
- ``save_config`` writes the resolved config as YAML; ``config_hash`` is a stable hash of it.

Config identity: a field declared with :func:`runtime` (``progress``, ``data.workers``, ``ckpt_every`` ...) or
:func:`location` (``name``, ``run_root``, ``out``) does not change a result. :func:`identity` is the config without
them; the checkpoint guard, the map-pass fingerprint and the study's stage hash are all taken over it, so a job
killed and rerun with ``progress=false`` or other ``data.workers`` resumes instead of being refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

import yaml

C = TypeVar("C")


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config that does not match its schema; the message names the offending key."""


RUNTIME, LOCATION, RANGE, MAX = "uedist_runtime", "uedist_location", "uedist_range", "uedist_max"
SEED_MAX = 2**32 - 1  # seeds enter generator arithmetic (seed x 1,000,003 + key): keep them well inside int64


def runtime(
    default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, positive_: bool = False
) -> Any:
    """A dataclass field that changes how a job runs (progress bars, workers, checkpoint cadence), never what it
    computes: left out of :func:`identity`, so it may differ between a run and its resumption. ``positive_``:
    the value must be > 0 (see :func:`positive`)."""
    meta: Dict[str, Any] = {RUNTIME: True, **({RANGE: (0, False)} if positive_ else {})}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def positive(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A number (or list of numbers) that must be > 0: sizes, widths, batch sizes, intervals."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={RANGE: (0, False)})


def signed(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A number that may be negative. Every other number of a schema must be >= 0 (the loader checks every
    field: a step count, a radius, a probability or an interval is never negative)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={RANGE: None})


def _check_range(f: "dataclasses.Field[Any]", value: Any, key: str) -> None:
    """Every number of a schema is finite and >= 0, or > 0 where declared :func:`positive`, unless declared
    :func:`signed`; lists and tuples of numbers element by element."""
    rng = f.metadata.get(RANGE, (0, True))
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise ConfigError(f"{key}={value!r}: must be a finite number")
        top = f.metadata.get(MAX, 2**53)  # an int beyond 2^53 is not a count, a size or a seed anyone means
        if isinstance(v, int) and abs(v) > top:
            raise ConfigError(f"{key}={value!r}: must be at most {top}")
        if rng is None:
            continue
        lo, inclusive = rng
        if v < lo or (v == lo and not inclusive):
            raise ConfigError(f"{key}={value!r}: must be {'>=' if inclusive else '>'} {lo}")


def location(default: Any = "") -> Any:
    """A dataclass field that says where a job's outputs go (``name``, ``run_root``, ``out``): left out of
    :func:`identity` (the outputs' place is not part of what they are)."""
    return dataclasses.field(default=default, metadata={LOCATION: True})


@dataclasses.dataclass
class JobConfig:
    """The run fields every stage's schema extends, declared once: where the run goes (``<run_root>/<name>``) and
    how it reports. A schema may set ``renamed`` (a ClassVar ``{old key: new key}``): a config using an old key
    is refused with the new name instead of "unknown key".

    The other run fields come in the small schemas below (each a JobConfig), which a stage's schema combines as it
    needs them: :class:`Seeded`, :class:`Resumable`, :class:`BF16` / :class:`Precision`, :class:`Cadence`. A stage
    takes only the ones it honours (a field that does nothing is not offered), and a seed is part of a result: a
    schema that had none does not get one (:func:`identity` of its configs would change). List the bases in the
    reverse of the order their fields should come in (``class X(Cadence, Precision, Resumable, Seeded)``: name,
    run_root, progress, seed, resume, bf16, channels_last, ckpt_every, log_every, log_with, then X's own). A schema
    may redeclare a field of these only to change its default, saying why beside it."""

    renamed: typing.ClassVar[Dict[str, str]] = {}

    name: str = location("job")
    run_root: str = location("runs")
    progress: bool = runtime(True)  # progress bars (false: log lines, for batch jobs)


@dataclasses.dataclass
class Seeded(JobConfig):
    """A stage whose random draws (initial weights, batches, noise) all derive from ``seed``."""

    seed: int = dataclasses.field(default=0, metadata={MAX: SEED_MAX})


@dataclasses.dataclass
class Resumable(JobConfig):
    """A stage that continues a killed run from its checkpoints (false: start afresh)."""

    resume: bool = runtime(True)


@dataclasses.dataclass
class BF16(JobConfig):
    """A stage that can compute under bf16 autocast."""

    bf16: Optional[bool] = False  # null = auto: on only where bf16 is native (uedist.precision)


@dataclasses.dataclass
class Precision(BF16):
    """bf16 autocast and channels-last memory layout (convolutional networks)."""

    channels_last: Optional[bool] = False  # null = auto: with native bf16


@dataclasses.dataclass
class Cadence(JobConfig):
    """A training stage's checkpoint and log cadence, in steps, and where its curves also go."""

    ckpt_every: int = runtime(500)
    log_every: int = runtime(50, positive_=True)
    log_with: str = runtime("")  # "tensorboard": scalars of every curve row under <run>/tb (off by default)


LOG_WITH = ("", "tensorboard")


def log_with_problem(cfg: Any) -> Optional[str]:
    """Why a job cannot send its curves where ``log_with`` says, or None: checked when a job or a study starts,
    before its run folder exists (TensorBoard is an optional extra, ``uedist[tensorboard]``). Not in ``validate``:
    a saved config with ``log_with: tensorboard`` still loads (a report, a resume check) where it is missing."""
    how = getattr(cfg, "log_with", "")
    if how not in LOG_WITH:
        return f"log_with is '' or 'tensorboard', got {how!r}"
    if how:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (what Tracker writes with)
        except ImportError as e:
            return (
                f"log_with=tensorboard needs the tensorboard package ({e}): pip install tensorboard (the "
                "uedist[tensorboard] extra), or leave log_with out"
            )
    return None


def identity(cfg: Any) -> Dict[str, Any]:
    """The resolved config without its runtime and location fields (recursively): what determines a result.
    The one source of the checkpoint guard, the map-pass fingerprint and the study stage hash."""

    def strip(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {
                f.name: strip(getattr(obj, f.name))
                for f in dataclasses.fields(obj)
                if not (f.metadata.get(RUNTIME) or f.metadata.get(LOCATION))
            }
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [strip(v) for v in obj]
        return obj

    return json.loads(json.dumps(strip(cfg), default=str))


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and return it (converted only where lossless: int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for sub in args:
            if sub is type(None):
                continue
            try:
                return _coerce(value, sub, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
    if origin in (list, List, Sequence, tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items ({_type_name(tp)}), got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        out = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, Dict, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-3" as a string
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: Type[C], data: Mapping[str, Any], prefix: str = "") -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    renamed: Mapping[str, str] = getattr(cls, "renamed", {})
    for k in data:
        if k in renamed and k not in fields:
            raise ConfigError(f"{prefix}{k!r} is now {prefix}{renamed[k]!r}: rename the key (same value and unit)")
        if k not in fields:
            close = difflib.get_close_matches(str(k), fields, n=1)
            hint = f" (did you mean {prefix}{close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown config key {prefix}{k!r}{hint}; known keys of {cls.__name__}: {', '.join(fields)}"
            )
    kwargs: Dict[str, Any] = {}
    for name, f in fields.items():
        tp = hints[name]
        if name in data:
            value = data[name]
            if _is_dataclass_type(tp) and isinstance(value, dict):
                # Nested sections merge into the section's defaults (experiment YAMLs hold only differences).
                base = _default_of(f)
                merged = _merge(dataclasses.asdict(base), value) if base is not None else value
                kwargs[name] = _build(tp, merged, prefix=f"{prefix}{name}.")
            else:
                kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ConfigError(f"missing required config key {prefix}{name!r} ({_type_name(tp)})")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def _default_of(f: "dataclasses.Field[Any]") -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    if f.default is not dataclasses.MISSING:
        return f.default
    return None


def _merge(base: Dict[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3). Values are parsed as YAML scalars/lists (``x=[1,2]``, ``x=null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from e
    return key.split("."), value


def _read_yaml(path: Union[str, os.PathLike], _seen: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    """The mapping of one YAML file, with its ``base:`` chain merged under it."""
    p = Path(path)
    if not p.is_file():
        where = f" (base of {_seen[-1]})" if _seen else ""
        raise ConfigError(f"config file not found: {p}{where}")
    if p.resolve() in _seen:
        raise ConfigError(f"{p}: base chain loops: {' -> '.join(map(str, (*_seen, p.resolve())))}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{p}: base: expected a YAML path (relative to this file), got {base!r}")
    return _merge(_read_yaml(p.parent / base, (*_seen, p.resolve())), data)


def config_from_dict(cls: Type[C], data: Mapping[str, Any]) -> C:
    """Build and validate a config from a plain mapping (strict, as ``load_config``)."""
    cfg = _build(cls, _merge(dataclasses.asdict(cls()), data) if _all_defaults(cls) else data)
    _validate(cfg, "")
    return cfg


def _all_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
        for f in dataclasses.fields(cls)
    )


MAX_NESTING = 32  # no schema nests deeper; a deeper YAML value is a hostile or broken file


def load_config(cls: Type[C], path: Optional[Union[str, os.PathLike]] = None, overrides: Sequence[str] = ()) -> C:
    """Defaults of ``cls``, then the YAML file (if given), then ``key=value`` overrides, checked strictly."""
    try:
        return _load_config(cls, path, overrides)
    except RecursionError:
        raise ConfigError(f"{path or 'overrides'}: values nested too deeply to be a config") from None


def _depth(x: Any, limit: int = MAX_NESTING) -> int:
    """Nesting depth of lists / mappings, stopping (without recursing further) past ``limit``."""
    stack, deepest = [(x, 0)], 0
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        if isinstance(node, dict):
            stack += [(v, d + 1) for v in node.values()]
        elif isinstance(node, (list, tuple)):
            stack += [(v, d + 1) for v in node]
    return deepest


def _load_config(cls: Type[C], path: Optional[Union[str, os.PathLike]], overrides: Sequence[str]) -> C:
    data: Dict[str, Any] = _read_yaml(path) if path else {}
    if _depth(data) > MAX_NESTING:
        raise ConfigError(f"{path}: values nested more than {MAX_NESTING} deep: not a config")
    for text in overrides:
        keys, value = parse_override(text)
        if _depth(value) > MAX_NESTING:
            raise ConfigError(f"override {text[:60]!r}...: value nested more than {MAX_NESTING} deep")
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if not isinstance(nxt, dict):
                nxt = {}
                node[k] = nxt
            node = nxt
        node[keys[-1]] = value
    return config_from_dict(cls, data)


def _validate(cfg: Any, prefix: str) -> None:
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            _validate(v, f"{prefix}{f.name}.")
        else:
            _check_range(f, v, f"{prefix}{f.name}")
    check = getattr(cfg, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from e


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """The resolved config as plain YAML/JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg: Any, path: Union[str, os.PathLike]) -> Path:
    """Write the resolved config as YAML atomically; returns the path."""
    from uedist.io import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_hash(cfg: Any, length: int = 12) -> str:
    """A stable short hash of the resolved config (key order independent)."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def run_dir(run_root: Any, name: str) -> Path:
    """``run_root/name``, the folder of a run; ConfigError (naming ``name``) when ``name`` is empty, absolute or
    has a ``.``/``..`` part, so that no run writes outside ``run_root``. Nested names (``study/exp1``) are fine."""
    parts = str(name).replace("\\", "/").split("/")
    if any(ord(c) < 32 or ord(c) == 127 for c in str(name)):
        raise ConfigError(f"name={name!r}: a run name may not hold control characters (a newline, a tab)")
    if any(len(p.encode()) > 255 for p in parts):
        raise ConfigError(f"name={str(name)[:40]!r}...: each part of a run name is at most 255 bytes (a file name)")
    if not name or str(name).startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(
            f"name={name!r}: a run name is a relative path of plain names (e.g. sem_cifar10 or study/exp1); "
            f"this one would put the run outside run_root {run_root}"
        )
    return Path(run_root) / name


def require(cond: bool, message: str) -> None:
    """For ``validate`` methods: raise ConfigError(message) unless ``cond``."""
    if not cond:
        raise ConfigError(message)
