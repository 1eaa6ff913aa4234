"""Data flows one way: app -> (engine, vision) ; engine -> (vision, kernels) ; vision -> kernels.
Walks every module's AST and fails on an import against that direction, and on an import cycle
between the modules of one package (imports inside functions count: they only hide a cycle).
kernels/ is imported as `vlserve_kernels` (the link beside it): the bare name `kernels` belongs to
Hugging Face's package, a dependency of transformers >= 5.25, and the two cannot share one process."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALLOWED = {
    "vlserve_kernels": set(),
    "vision": {"vlserve_kernels"},
    "engine": {"vision", "vlserve_kernels"},
    "app": {"engine", "vision"},
}


def _imported_top_names(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _import_module_strings(path: pathlib.Path) -> set[str]:
    """Top names of importlib.import_module("a.b") calls with a literal argument."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value.split(".")[0])
    return names


def _imported_top_packages(path: pathlib.Path) -> set[str]:
    return _imported_top_names(path) & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_layering(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = []
    for path in files:
        for target in _imported_top_packages(path) - {package} - ALLOWED[package]:
            bad.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_nothing_imports_kernels_by_its_directory_name():
    """`import kernels` would get Hugging Face's package where it is installed (or load our modules a
    second time, with their own tuning tables and counters, where the repo root is on sys.path)."""
    bad = []
    for folder in ["app", "vision", "engine", "kernels", "tests", "bench", "samples"]:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "kernels" in {*_imported_top_names(path), *_import_module_strings(path)}:
                bad.append(str(path.relative_to(ROOT)))
    assert not bad, "imports the bare name `kernels` (use vlserve_kernels):\n" + "\n".join(bad)


def test_kernels_link_points_at_the_kernels_folder():
    assert (ROOT / "vlserve_kernels").is_symlink()
    assert (ROOT / "vlserve_kernels").resolve() == (ROOT / "kernels").resolve()


def test_checker_catches_a_wrong_edge(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import app.server\nfrom engine.core import EngineCore\nfrom .x import y\n")
    assert _imported_top_packages(bad) == {"app", "engine"}


def _module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: pathlib.Path, known: set[str], root: pathlib.Path = ROOT) -> set[str]:
    """Our modules that `path` imports anywhere: `from a.b import c` is a.b.c when that is a
    module, else a.b; relative imports resolved."""
    name, is_package = _module_name(path, root), path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(parent[:len(parent) - node.level + 1] + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for neighbour in sorted(graph[node] & graph.keys()):
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            component = [stack.pop()]
            while component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_cycle_inside_a_package(package):
    files = {_module_name(path): path for path in sorted((ROOT / package).rglob("*.py"))}
    graph = {name: _imported_modules(path, set(files)) for name, path in files.items()}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(cycle) for cycle in cycles)


def test_cycle_finder_sees_a_cycle_hidden_in_a_function(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("from pkg.b import thing\n")
    (package / "b.py").write_text("def f():\n    from . import a\n")
    (package / "c.py").write_text("import pkg.a\n")
    known = {"pkg.a", "pkg.b", "pkg.c"}
    graph = {name: _imported_modules(package / f"{name[4:]}.py", known, tmp_path) for name in known}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.b"]]
