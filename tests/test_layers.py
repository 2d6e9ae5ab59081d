"""The package's layering: imports point down (CLI -> steps -> building blocks -> foundation), never in a cycle.

Read from the source with ``ast`` (nothing is imported), so a lazy import inside a function counts as much as one
at the top. The layer of a module is that of its top-level package under ``comoto_cli``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "comoto_cli"

# Layer of each top-level package or module; a module may import its own layer or lower ones.
LAYERS = {
    # 0 foundation: no knowledge of detection
    "errors": 0, "config": 0, "utils": 0,
    # 1 building blocks
    "networks": 1, "losses": 1, "metrics": 1, "data": 1, "cache": 1, "transforms": 1,
    # 2 library steps, each behind one CLI command (experiment chains them)
    "preprocess": 2, "engine": 2, "evaluation": 2, "inference": 2, "synth": 2, "experiment": 2,
    # 3 command line
    "cli": 3, "commands": 3, "__main__": 3, "demo": 3,
    "__init__": 0,  # comoto_cli itself: the version only
}
CLI_LAYER = 3


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """comoto_cli modules imported anywhere in ``path`` (``from a.b import c`` counts a.b.c when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    return LAYERS[_top(module)]


def test_every_package_has_a_layer():
    assert {_top(name) for name in _modules()} <= set(LAYERS), "add the new package to LAYERS"


def test_no_upward_import_and_the_library_never_imports_the_cli():
    upward = sorted(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
                    for module, targets in _graph().items() for target in targets
                    if _layer(target) > _layer(module))
    assert not upward, "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_modules():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        packages.setdefault(_top(module), set()).update(_top(t) for t in targets if _top(t) != _top(module))
    packages.pop("__init__", None)
    cycle = _cycle({name: targets - {"__init__"} for name, targets in packages.items()})
    assert cycle is None, " -> ".join(cycle or [])


def test_library_imports_its_own_modules_at_the_top():
    """Lazy imports hide the dependency graph; the CLI alone keeps them (so `comoto --help` starts without torch)."""
    lazy = []
    for name, path in _modules().items():
        if _layer(name) == CLI_LAYER:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [f"{name}:{node.lineno}" for node in ast.walk(function)
                         if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("comoto_cli")]
    assert not lazy, lazy


@pytest.mark.parametrize("graph, expected", [({"a": {"b"}, "b": {"a"}}, True), ({"a": {"b"}, "b": set()}, False),
                                             ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True)])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert (_cycle(graph) is not None) == expected


def test_an_upward_import_would_be_seen(tmp_path):
    """The rules above act on what ``_imports`` finds: it sees lazy and aliased imports."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from comoto_cli.commands import common\n    import comoto_cli.cli as c\n")
    modules = {"comoto_cli.commands": Path(), "comoto_cli.commands.common": Path(), "comoto_cli.cli": Path()}
    assert _imports(source, modules) == {"comoto_cli.commands", "comoto_cli.commands.common", "comoto_cli.cli"}
