"""The package's layout holds: data and imports flow one way through the stages, no import cycles,
small functions, a thin CLI (read from the sources with `ast`, nothing imported)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mosaicrt"
# Stages in pipeline order; a module may import its own stage and earlier ones only. The ground
# floor (errors, argument types, safe outputs, ONNX graph helpers, the entry-point runner) is first.
STAGES = ["ground", "ops", "model", "export", "plugins", "runtime", "train", "eval", "bench",
          "commands", "cli"]  # fmt: skip
GROUND = {"mosaicrt", "errors", "argtypes", "outputs", "onnx_graph", "entry"}
MAX_FUNCTION_LINES = 80
MAX_CLI_LINES = 350


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
    first = module.split(".")[1] if "." in module else "mosaicrt"
    return "ground" if first in GROUND else first


def imports(tree: ast.Module, top_level_only: bool) -> set[str]:
    """mosaicrt modules imported anywhere in the tree (or by the module body alone)."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mosaicrt"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mosaicrt")}
    return found


SOURCES = {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_belongs_to_a_stage():
    assert {stage(m) for m in SOURCES} <= set(STAGES)


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_no_module_imports_a_later_stage(module):
    mine = STAGES.index(stage(module))
    later = [m for m in imports(SOURCES[module], False) if STAGES.index(stage(m)) > mine]
    assert not later, f"{module} ({stage(module)}) imports later stages: {later}"


def test_no_import_cycles():
    graph = {m: {i for i in imports(tree, True) if i in SOURCES} for m, tree in SOURCES.items()}
    state: dict[str, str] = {}  # module -> "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for nxt in sorted(graph[module]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_functions_are_short_and_the_cli_thin():
    long = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module, tree in SOURCES.items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long
    assert len((PACKAGE / "cli.py").read_text().splitlines()) < MAX_CLI_LINES
