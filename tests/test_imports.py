"""Module dependencies stay one-way (issue 14, item 6): the shared building blocks
(`mamba3_jax.nn`) and the baselines never import the Mamba-3 layer or model modules, and no
module of the package takes part in an import cycle. Read from the source (AST), so it is cheap
and also sees imports hidden inside functions."""

import ast
import pathlib

import mamba3_jax

PKG = pathlib.Path(mamba3_jax.__file__).parent
# directories other sessions own and that are not part of the model's import graph
SKIP = ("training",)


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def is_main_guard(node) -> bool:
    """`if __name__ == "__main__":` -- a command-line entry point, run only as a script."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def walk(node):
    yield node
    for child in ast.iter_child_nodes(node):
        if not is_main_guard(child):
            yield from walk(child)


def imports_of(path: pathlib.Path) -> set[str]:
    """Every mamba3_jax module a file imports, at any nesting level (script entry points
    under a __main__ guard excepted)."""
    out = set()
    for node in walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("mamba3_jax"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("mamba3_jax"):
                out.add(node.module)
    return out


def graph() -> dict[str, set[str]]:
    files = [p for p in PKG.rglob("*.py") if not any(s in p.parts for s in SKIP)]
    mods = {module_name(p): p for p in files}
    g = {}
    for name, path in mods.items():
        # `from mamba3_jax.x import y` where y is a module counts as importing x.y; a package
        # import counts as the package's __init__ only
        g[name] = {m for m in imports_of(path) if m in mods and m != name
                   and m != "mamba3_jax"}
    return g


def reachable(g, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in g.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_shared_blocks_and_baselines_do_not_import_the_mamba3_layers():
    g = graph()
    for mod in ["mamba3_jax.nn"] + sorted(m for m in g if m.startswith("mamba3_jax.baselines")):
        bad = reachable(g, mod) & {"mamba3_jax.layers", "mamba3_jax.model"}
        assert not bad, f"{mod} depends on {sorted(bad)}"


def test_layers_and_baselines_share_nn():
    g = graph()
    assert "mamba3_jax.nn" in g["mamba3_jax.layers"]
    assert "mamba3_jax.nn" in g["mamba3_jax.baselines.mamba2"]


def test_no_import_cycles():
    g = graph()
    cyclic = sorted(m for m in g if m in reachable(g, m))
    assert not cyclic, f"modules on an import cycle: {cyclic}"
