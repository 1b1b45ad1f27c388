"""The package's layering and size rules, read from the source with ``ast`` (nothing is imported).

Layers, each importing only from the ones below it (and from inside its own package):
the base modules (``uedist/{config,registry,dist,io,checkpoint,precision}.py``) → ``uedist.ops`` (pure tensor
functions) → ``uedist.models`` | ``uedist.data`` (siblings: neither imports the other) → ``uedist.diffusion`` →
``uedist.engine`` → ``uedist.app`` → ``uedist.benchmark`` | ``uedist.bench``; nothing in ``uedist`` imports
``launch/``. The base modules may import each other; every other layer is one or two packages. Imports
inside functions count. Sizes: no module of ``uedist/engine`` over 450 lines, no function in ``uedist/`` or
``launch/`` over 80 lines (``def`` line to last line, decorators excluded).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "uedist"

# Each top-level module or subpackage of uedist -> its layer; a name not listed here fails the test (place it).
LAYER = {
    "__init__": 0,
    "config": 0,
    "registry": 0,
    "dist": 0,
    "io": 0,
    "checkpoint": 0,
    "precision": 0,
    "ops": 1,
    "models": 2,
    "data": 2,
    "diffusion": 3,
    "engine": 4,
    "app": 5,
    "benchmark": 6,
    "bench": 6,
}
BASE = {name for name, layer in LAYER.items() if layer == 0}
MAX_ENGINE_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules(root: Path) -> List[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _part(path: Path) -> str:
    """The top-level module or subpackage of uedist that ``path`` belongs to."""
    rel = path.relative_to(PKG).with_suffix("").parts
    return rel[0]


def _imported(path: Path, tree: ast.AST) -> Iterator[Tuple[int, str]]:
    """(line, dotted name) of every module ``path`` imports, at any depth; ``from a import b`` gives ``a.b``
    too (b may be a module), relative imports resolved against ``path``'s package."""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def _target(name: str) -> Optional[str]:
    """The uedist part a dotted import names (``uedist.engine.x`` -> ``engine``; ``uedist`` itself, or a name
    defined in its ``__init__`` -> ``__init__``), ``launch`` for the launch scripts, None for anything else."""
    parts = name.split(".")
    if parts[0] == "launch":
        return "launch"
    if parts[0] != "uedist":
        return None
    if len(parts) == 1 or not ((PKG / parts[1]).is_dir() or (PKG / f"{parts[1]}.py").is_file()):
        return "__init__"  # e.g. ``from uedist import __version__``
    return parts[1]


def module_violations(path: Path, source: str) -> List[str]:
    """The imports of the uedist module at ``path`` (its text: ``source``) that break the layering."""
    me, where = _part(path), path.relative_to(ROOT)
    if me not in LAYER:
        return [f"{where}: uedist.{me} is in no layer (add it to LAYER in tests/test_layers.py)"]
    bad, seen = [], set()
    for line, name in _imported(path, ast.parse(source, str(path))):
        tgt = _target(name)
        if tgt is None or tgt == me or {tgt, me} <= BASE or (line, tgt) in seen:
            continue
        seen.add((line, tgt))  # once per statement and layer: ``from a import b`` names a and a.b
        if tgt == "launch":
            bad.append(f"{where}:{line}: imports {name} (nothing in uedist imports launch/)")
        elif tgt not in LAYER:
            bad.append(f"{where}:{line}: imports {name}, in no layer (add it to LAYER in tests/test_layers.py)")
        elif LAYER[tgt] >= LAYER[me]:
            bad.append(f"{where}:{line}: uedist.{me} (layer {LAYER[me]}) imports {name} (layer {LAYER[tgt]})")
    return bad


def layer_violations() -> List[str]:
    return sorted(set(b for path in _modules(PKG) for b in module_violations(path, path.read_text())))


def size_violations() -> List[str]:
    bad = []
    for path in _modules(PKG / "engine"):
        n = len(path.read_text().splitlines())
        if n > MAX_ENGINE_MODULE_LINES:
            bad.append(f"{path.relative_to(ROOT)}: {n} lines (engine modules: at most {MAX_ENGINE_MODULE_LINES})")
    for path in _modules(PKG) + _modules(ROOT / "launch"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    bad.append(
                        f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} is {n} lines "
                        f"(at most {MAX_FUNCTION_LINES}: split it into named helpers)"
                    )
    return bad


def test_imports_only_go_down_the_layers():
    bad = layer_violations()
    assert not bad, "upward (or sideways) imports:\n" + "\n".join(bad)


def test_module_and_function_sizes():
    bad = size_violations()
    assert not bad, "over the size rules:\n" + "\n".join(bad)


def test_the_layer_check_sees_upward_imports():
    """The checker itself: an engine import inside a function of ops, a launch import, and data importing models
    are caught; ops importing the base modules and ops is not."""
    probe = PKG / "ops" / "_probe.py"
    src = (
        "from uedist.config import require\nfrom uedist.ops.pgd import pgd\nimport torch\n\n\n"
        "def f():\n    from uedist.engine.train.loop import run_steps\n    import launch.attack\n"
    )
    bad = module_violations(probe, src)
    assert len(bad) == 2 and "uedist.engine.train.loop" in bad[0] and "launch" in bad[1], bad
    assert len(module_violations(PKG / "data" / "_probe.py", "from uedist import models\n")) == 1
    assert module_violations(PKG / "data" / "_probe.py", "from uedist import __version__, ops\n") == []
