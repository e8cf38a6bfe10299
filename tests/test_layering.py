"""The package layering of docs/CONVENTIONS.md, checked on the source: every import of every module
(at the top or inside a function) runs down the layers, never up, no two packages (or two
modules, through their top-level imports) import each other in a circle, and in-repo imports sit
at the top of files (LAZY_ALLOWED: the few measured exceptions). Parses files, imports nothing: fast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("xray", "ipa_core", "boed")
BOED_CORE = ("geometry", "estimators", "incremental", "scoring", "samplers", "policies", "classifier", "heatmaps", "scan_loop",
             "train_avp")
# Lowest first; a unit may import units of its own layer or lower ones (never a circle).
LAYERS: list[tuple[str, ...]] = [
    ("xray",),
    ("ipa_core",),
    tuple(f"boed.{m}" for m in BOED_CORE),
    ("boed.baselines", "boed.amortised"),
    ("boed.evaluation",),
    ("boed.demo", "boed.demo_publish", "boed.study", "boed.adaptivity"),
    ("boed.commands",),
    ("boed", "boed.cli", "boed.__main__"),
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(f): f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = modules()


def unit(module: str) -> str:
    """The layering unit of a module: a top-level package, or ``boed.<first part>``."""
    parts = module.split(".")
    return parts[0] if parts[0] != "boed" or len(parts) == 1 else f"boed.{parts[1]}"


def imports(module: str, path: Path) -> list[tuple[str, bool, int]]:
    """``(imported in-repo module, at the top of the file, line)`` of every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + is_pkg]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # `from pkg import sub` names the module pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in PACKAGES:
                out.append((t, id(node) in top, node.lineno))
    return out


EDGES = [(m, t, at_top, line) for m, p in MODULES.items() for t, at_top, line in imports(m, p)]


def test_every_unit_has_a_layer():
    missing = sorted({unit(m) for m in MODULES} - set(RANK))
    assert not missing, f"add {missing} to a layer in docs/CONVENTIONS.md and LAYERS here"


def test_no_import_runs_up_the_layers():
    up = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t} ({unit(m)} is layer {RANK.get(unit(m))}, "
          f"{unit(t)} is layer {RANK.get(unit(t))})"
          for m, t, _, line in EDGES if RANK.get(unit(t), -1) > RANK.get(unit(m), -1)]
    assert not up, "\n".join(up)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` (as a path), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_circle_between_units():
    graph: dict[str, set[str]] = {}
    for m, t, _, _ in EDGES:
        if unit(m) != unit(t):
            graph.setdefault(unit(m), set()).add(unit(t))
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_circle_between_modules():
    graph: dict[str, set[str]] = {}
    for m, t, at_top, _ in EDGES:
        if at_top and t in MODULES and t != m and not m.startswith(t + "."):  # a package's own __init__ is no circle
            graph.setdefault(m, set()).add(t)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


# In-repo imports that stay inside a function (file, imported module): each one would pull a heavy
# third-party library into a console script's start (measured with `python -m <cli> --help`, best of 3).
# The import line says the same; keep this list short and every entry measured.
LAZY_ALLOWED = {
    # pandas: +0.5 s on `xray --help`, which imports every command module to build its parser
    ("xray/commands/info.py", "xray.cache"),
    ("xray/commands/info.py", "xray.chestmnist"),
    ("xray/commands/info.py", "xray.nih"),
    ("xray/commands/prepare.py", "xray.cache"),
    ("xray/commands/prepare.py", "xray.chestmnist"),
    # the phantom renderer (scipy.ndimage): +0.6-0.75 s on `boed --help` and `ipa_core --help`
    ("xray/dataset.py", "xray.phantom"),
}


def _inner_imports() -> list[tuple[str, str, int]]:
    return [(MODULES[m].relative_to(ROOT).as_posix(), t, line) for m, t, at_top, line in EDGES if not at_top]


def test_the_repository_is_imported_at_the_top_of_its_files():
    """docs/CONVENTIONS.md: imports sit at the top, in xray, ipa_core and boed alike (lazy imports
    are kept for heavy third-party libraries, which this test does not look at, and LAZY_ALLOWED)."""
    inner = [f"{path}:{line} imports {t} inside a function" for path, t, line in _inner_imports()
             if (path, t) not in LAZY_ALLOWED]
    assert not inner, "\n".join(inner)


def test_lazy_allowed_has_no_stale_entries():
    stale = LAZY_ALLOWED - {(path, t) for path, t, _ in _inner_imports()}
    assert not stale, f"remove {sorted(stale)} from LAZY_ALLOWED: those imports are at the top now (or gone)"


@pytest.mark.parametrize("graph, circle", [({"a": {"b"}, "b": {"a"}}, True), ({"a": {"b"}, "b": {"c"}}, False)])
def test_cycle_finder_known_answers(graph, circle):
    assert (_cycle(graph) is not None) == circle
