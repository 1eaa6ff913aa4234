"""Data flows one way: app -> (engine, vision) ; engine -> (vision, kernels) ; vision -> kernels.
Walks every module's AST and fails on an import against that direction."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALLOWED = {
    "kernels": set(),
    "vision": {"kernels"},
    "engine": {"vision", "kernels"},
    "app": {"engine", "vision"},
}


def _imported_top_packages(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_layering(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = []
    for path in files:
        for target in _imported_top_packages(path) - {package} - ALLOWED[package]:
            bad.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_checker_catches_a_wrong_edge(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import app.server\nfrom engine.core import EngineCore\nfrom .x import y\n")
    assert _imported_top_packages(bad) == {"app", "engine"}
