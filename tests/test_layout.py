"""The package's import graph: the kernels never import the library, the serving library never
imports the lab (but for `lserve run`, which imports it when invoked) nor the lab's extra
dependencies, and no two modules import each other, directly or around a cycle."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).parents[1]
LAB_ONLY = ("matplotlib", "optax")  # the `lab` extra of pyproject.toml
SERVE_ONLY = ("fastapi", "uvicorn", "starlette")  # the `serve` extra


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in ("lserve_jax", "pallas_kernels"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: pathlib.Path, name: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement of the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".")[: -node.level or None]
                base = ".".join(package + ([base] if base else []))
            found.append((base, id(node) in top))
            found += [(f"{base}.{alias.name}", id(node) in top) for alias in node.names]
    return found


MODULES = _modules()
GRAPH = {name: [(m, top) for m, top in _imports(path, name)] for name, path in MODULES.items()}


def _is_library(name: str) -> bool:
    return name.startswith("lserve_jax") and not name.startswith("lserve_jax.lab")


def test_kernels_import_jax_only():
    for name, imports in GRAPH.items():
        if name.startswith("pallas_kernels"):
            assert not [m for m, _ in imports if m.startswith("lserve_jax")], name


def test_library_never_imports_the_lab_or_its_dependencies():
    for name, imports in GRAPH.items():
        if not _is_library(name):
            continue
        for module, top in imports:
            assert not module.startswith(LAB_ONLY), f"{name} imports {module}"
            if module.startswith("lserve_jax.lab"):
                # only the command line reaches the lab, inside `lserve run`
                assert name == "lserve_jax.cli" and not top, f"{name} imports {module}"


def test_only_the_server_imports_the_web_stack():
    """The engine and the offline API run without the `serve` extra; the command line reaches
    the server inside `lserve serve` only."""
    for name, imports in GRAPH.items():
        for module, top in imports:
            if module.startswith(SERVE_ONLY) or module == "lserve_jax.server":
                assert name == "lserve_jax.server" or (name == "lserve_jax.cli" and not top), (
                    f"{name} imports {module}")


def test_no_import_cycles():
    edges = {name: sorted({m for m, _ in imports if m in MODULES and m != name})
             for name, imports in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_the_graph_sees_the_imports():
    """The checks above would pass vacuously if the parser found nothing."""
    assert ("lserve_jax.config", True) in GRAPH["lserve_jax.engine.core"]
    assert ("lserve_jax.lab.run", False) in GRAPH["lserve_jax.cli"]
    assert len([n for n in MODULES if n.startswith("lserve_jax.lab")]) >= 8


def test_backends_phases_and_prefill_paths_are_never_compared_as_strings():
    """The library's seam dispatches once, through the backend registry and enums: no module of
    lserve_jax compares a value against a backend, phase or prefill-path name (the kernels'
    `implementation="cudnn" | "xla"` argument mirrors jax.nn.dot_product_attention's)."""
    names = {"reference", "cudnn", "pallas", "pallas_interpret", "prefill", "chunk", "decode",
             "fused", "composite", "windowed"}
    for name, path in MODULES.items():
        if not name.startswith("lserve_jax"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Compare, ast.Match)):
                literals = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}
                assert not literals & names, f"{name}:{node.lineno} compares a string mode"
