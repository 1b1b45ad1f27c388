"""A small name -> builder registry (models, dataset sources, stages).

    MODELS = Registry("model")

    @MODELS.register("resnet18")
    def resnet18(num_classes: int = 10, **kw): ...

    MODELS.build("resnet18", num_classes=100)

Unknown names fail with the list of known ones (and the closest match); registering a name twice is an error,
so two modules can never silently shadow each other.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class RegistryError(KeyError):
    """An unknown or duplicate registry name. Subclasses KeyError; str() is the plain message."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, Callable[..., Any]] = {}

    def register(self, name: Optional[str] = None) -> Callable[[T], T]:
        """Decorator: register ``fn`` under ``name`` (default: the function's ``__name__``)."""

        def deco(fn: T) -> T:
            key = name or fn.__name__
            if key in self._items:
                raise RegistryError(f"{self.kind} {key!r} is already registered (by {self._items[key].__module__})")
            self._items[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}{hint} known {self.kind}s: {', '.join(sorted(self._items)) or '(none)'}"
            ) from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


MODELS = Registry("model")
SOURCES = Registry("dataset source")


# ----------------------------------------------------------------------------------------------------------- stages
STAGE_KINDS = ("attack", "purify", "victim", "ddpm")


@dataclass(frozen=True)
class StageDef:
    """One stage of uedist: everything the launch scripts, the study pipeline, the CLI and the report need to know
    about it, declared once where the stage is written (``@stage(...)`` on its entry function).

    ``fn(cfg, accelerator, run_dir) -> summary`` runs it. ``inputs`` are the dotted config keys of the shard sets
    (or runs) it reads, each named by its last part, the *role* (``data.train`` -> ``train``, ``data.src`` ->
    ``src``, ``ddpm`` -> ``ddpm``). ``output`` is the summary key (and folder name) of the set it writes: "" for a
    stage that writes none, ``"run"`` for one whose output is its run folder (a trained DDPM). ``summary(s, run_dir)``
    renders the end-of-job text. ``fixed`` are overrides every run of the stage gets (the method name: several
    stages may share one schema). ``input_errors`` are exception types meaning bad input (exit code 2);
    ``check(cfg)`` may return a message that refuses a config before the job starts (a launch-time requirement)."""

    name: str
    kind: str
    schema: type
    fn: Callable[..., Dict[str, Any]]
    inputs: Tuple[str, ...]
    output: str = ""
    summary: Optional[Callable[[Dict[str, Any], Any], str]] = None
    fixed: Tuple[Tuple[str, Any], ...] = ()
    input_errors: Tuple[type, ...] = ()
    check: Optional[Callable[[Any], Optional[str]]] = None
    doc: str = ""

    @property
    def roles(self) -> Dict[str, str]:
        """role -> dotted config key."""
        return {k.rsplit(".", 1)[-1]: k for k in self.inputs}

    def __call__(self, cfg: Any, accelerator: Any, run_dir: Any) -> Dict[str, Any]:
        return self.fn(cfg, accelerator, run_dir)


STAGES = Registry("stage")


def stage(
    name: str,
    *,
    kind: str,
    schema: type,
    inputs: Sequence[str],
    output: str = "",
    summary: Optional[Callable[[Dict[str, Any], Any], str]] = None,
    fixed: Optional[Mapping[str, Any]] = None,
    input_errors: Sequence[type] = (),
    check: Optional[Callable[[Any], Optional[str]]] = None,
) -> Callable[[T], T]:
    """Register the decorated entry function ``fn(cfg, accelerator, run_dir) -> summary`` as stage ``name``.
    A schema with a ``method`` field gets ``method=<name>`` fixed, so one schema may serve several stages."""
    if kind not in STAGE_KINDS:
        raise RegistryError(f"stage {name!r}: kind must be one of {STAGE_KINDS}, got {kind!r}")
    fix = dict(fixed or {})
    if "method" in getattr(schema, "__dataclass_fields__", {}):
        fix.setdefault("method", name)

    def deco(fn: T) -> T:
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        STAGES.register(name)(
            StageDef(
                name,
                kind,
                schema,
                fn,
                tuple(inputs),
                output,
                summary,  # type: ignore[arg-type]
                tuple(fix.items()),
                tuple(input_errors),
                check,
                doc,
            )
        )
        return fn

    return deco


def stages_of(kind: str) -> List[str]:
    """The registered stage names of one kind, sorted."""
    return [n for n in STAGES.names() if STAGES.get(n).kind == kind]
