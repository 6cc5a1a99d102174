"""The package's import structure: no cycles among module-level imports, no module
importing another's private names, and the rank arithmetic and name matching not taken
from convert.py."""

import ast
from pathlib import Path

import lowrank_layers

PACKAGE = Path(lowrank_layers.__file__).parent


def relative_imports(tree: ast.Module, *, top_level_only: bool) -> list[ast.ImportFrom]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    return [n for n in nodes if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module]


def parsed() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def test_no_module_imports_another_modules_private_names():
    offenders = [
        f"{name}: from .{node.module} import {alias.name}"
        for name, tree in parsed().items()
        for node in relative_imports(tree, top_level_only=False)
        for alias in node.names
        if alias.name.startswith("_") or (alias.asname or "").startswith("_")
    ]
    assert offenders == []


def test_module_level_imports_have_no_cycle():
    graph = {
        name: {node.module for node in relative_imports(tree, top_level_only=True)}
        for name, tree in parsed().items()
    }
    graph.pop("__init__")
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_rank_arithmetic_and_selection_are_not_taken_from_convert():
    arithmetic = {
        "allocate_ranks", "break_even_reason", "check_patterns", "factor_parameters",
        "layer_seed", "module_holders", "name_matches", "plan_rank", "resolve_rank",
        "saves_parameters", "weight_owners",
    }  # fmt: skip
    offenders = [
        f"{name}: {alias.name}"
        for name, tree in parsed().items()
        for node in relative_imports(tree, top_level_only=False)
        if node.module == "convert"
        for alias in node.names
        if alias.name in arithmetic
    ]
    assert offenders == []


def test_the_readme_lists_exactly_the_public_api():
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Public API", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    listed = [name for row in rows for name in row.split("|")[2].replace("`", "").split(", ")]
    listed = [name.strip() for name in listed]
    assert sorted(listed) == sorted(lowrank_layers.__all__)
    assert len(listed) == len(set(listed))
