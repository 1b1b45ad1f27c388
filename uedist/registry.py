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
    ``check(cfg)`` may return a message that refuses a config before the job starts (a launch-time requirement).

    ``smoke`` are ``key=value`` overrides (tiny widths, steps, batches) that make the stage run in seconds from its
    schema's defaults on the tiny synthetic set of the tests (``tests/conftest.py::synth_sets``: 16 px, 4 classes,
    240 train / 80 test images), its inputs given by role; the registry-parametrized tests
    (``tests/test_stages_smoke.py``) and ``launch/bench`` run every stage with them. ``budget`` is what every sample
    an attack writes must respect, as a function of its config: ``(norm, key)``, the ``linf`` / ``l2`` / ``l0`` norm
    of :class:`uedist.ops.budget.Budget` and the dotted config key holding its size (``("linf", "budget")``,
    ``("l2", "l2")``, ``("l0", "pixels")``); :meth:`budget_of` gives it (``Budget(*st.budget_of(cfg))``), and the
    tests check every written sample against it (and the summary's ``noise.budget``, where the stage reports one,
    against it).

    Tests cover a new stage with no other edit: the smoke and budget tests are parametrized over
    :func:`stages_of` after :func:`uedist.app.stages.load_stages`, which imports every module of the engine's
    subpackages and the ``UEDIST_PLUGINS`` modules. ``tests/conftest.py`` adds the test-only stage modules
    (``TEST_PLUGINS``: ``tests/toy_stages.py``, a toy attack and a toy purifier) to ``UEDIST_PLUGINS`` (and the
    checkout to ``PYTHONPATH``) before collection, so the parametrized tests collect them and the launch scripts and
    the study pipeline, run as subprocesses, find them. Such a module is not a ``test_*.py`` file: pytest would import
    it under a second name and register its stages twice."""

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
    smoke: Tuple[str, ...] = ()
    budget: Tuple[str, ...] = ()  # (norm, dotted config key) for an attack; () for the other kinds

    def budget_of(self, cfg: Any) -> Optional[Tuple[str, float]]:
        """``(norm, size)`` of the budget a config of this stage must respect (None: the stage declares none);
        ``uedist.ops.budget.Budget(*st.budget_of(cfg))`` is the checker (the registry sits below ``ops``)."""
        if not self.budget:
            return None
        norm, key = self.budget
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        return norm, float(value)

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
    smoke: Sequence[str] = (),
    budget: Sequence[str] = (),
) -> Callable[[T], T]:
    """Register the decorated entry function ``fn(cfg, accelerator, run_dir) -> summary`` as stage ``name``.
    A schema with a ``method`` field gets ``method=<name>`` fixed, so one schema may serve several stages.
    ``smoke``: ``key=value`` overrides for a seconds-long run on the tests' tiny synthetic set; ``budget``:
    ``(norm, config key)`` of an attack's output (:class:`StageDef`)."""
    if kind not in STAGE_KINDS:
        raise RegistryError(f"stage {name!r}: kind must be one of {STAGE_KINDS}, got {kind!r}")
    if isinstance(smoke, str) or any("=" not in o for o in smoke):
        raise RegistryError(f"stage {name!r}: smoke must be a sequence of key=value overrides, got {smoke!r}")
    if budget and (len(budget) != 2 or budget[0] not in ("linf", "l2", "l0")):
        raise RegistryError(f"stage {name!r}: budget must be (norm, config key), norm linf/l2/l0, got {budget!r}")
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
                tuple(smoke),
                tuple(budget),
            )
        )
        return fn

    return deco


def stages_of(kind: str) -> List[str]:
    """The registered stage names of one kind, sorted."""
    return [n for n in STAGES.names() if STAGES.get(n).kind == kind]
