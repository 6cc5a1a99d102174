"""The package's import structure: no import cycle, counting the imports inside functions;
the storage and transformers modules layered one way; no module importing another's
private names; and the rank arithmetic and name matching not taken from convert.py."""

import ast
from pathlib import Path

import lowrank_layers

PACKAGE = Path(lowrank_layers.__file__).parent


def relative_imports(tree: ast.Module, *, top_level_only: bool) -> list[ast.ImportFrom]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    return [n for n in nodes if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module]


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(tree: ast.Module) -> set[str]:
    """The package modules ``tree`` imports when it runs: at module level and inside
    functions alike, leaving out ``if TYPE_CHECKING:`` blocks (never executed)."""
    found: set[str] = set()
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import / from . import x
            found.update([node.module] if node.module else [a.name for a in node.names])
        todo.extend(
            child
            for child in ast.iter_child_nodes(node)
            if not (_type_checking_only(node) and child in node.body)
        )
    return found


def parsed() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def import_graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    graph = {name: runtime_imports(tree) for name, tree in trees.items()}
    graph.pop("__init__", None)  # it imports every module; none imports it back
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])) is not None:
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])) is not None:
            return cycle
    return None


def test_the_package_has_no_import_cycle_counting_imports_inside_functions():
    cycle = find_cycle(import_graph(parsed()))
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_the_cycle_check_sees_imports_inside_functions_but_not_type_checking_blocks():
    trees = {
        "a": ast.parse("from .b import f\n"),
        "b": ast.parse("def f():\n    from .c import g\n    return g()\n"),
        "c": ast.parse(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n"
        ),
    }
    assert import_graph(trees) == {"a": {"b"}, "b": {"c"}, "c": set()}
    assert find_cycle(import_graph(trees)) is None
    trees["c"] = ast.parse("def g():\n    from .a import x\n    return x\n")
    assert find_cycle(import_graph(trees)) == ["a", "b", "c", "a"]


def test_the_storage_and_transformers_modules_import_one_way():
    """atomic <- safetensors_io <- checkpoint_format <- hf_quantizer <- checkpoint <- offline,
    hf; the lower ones import only the dependency-free helpers and the layers."""
    graph = import_graph(parsed())
    assert graph["atomic"] == {"common"}
    assert graph["safetensors_io"] == {"atomic", "common"}
    assert graph["text"] == {"common"}
    assert graph["lazy_weight"] == set()
    assert graph["readers"] == {"common"}
    layers = {"adaptive", "common", "dynamic", "linear", "linears", "safetensors_io", "selection"}
    assert graph["checkpoint_format"] <= layers
    assert graph["hf_quantizer"] <= {"checkpoint_format", "common", "safetensors_io"}
    assert {"checkpoint_format", "hf_quantizer", "safetensors_io"} <= graph["checkpoint"]
    assert "offline" not in graph["checkpoint"] and "hf" not in graph["checkpoint"]
    assert {"checkpoint", "checkpoint_format", "safetensors_io"} <= graph["offline"]


def test_no_module_imports_another_modules_private_names():
    offenders = [
        f"{name}: from .{node.module} import {alias.name}"
        for name, tree in parsed().items()
        for node in relative_imports(tree, top_level_only=False)
        for alias in node.names
        if alias.name.startswith("_") or (alias.asname or "").startswith("_")
    ]
    assert offenders == []


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
