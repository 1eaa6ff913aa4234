"""The programmatic-dependent-launch rule (kernels/dependent_launch.py), checked on the source:
the interpreter has no griddepcontrol, so what the CPU can check is that every kernel launched with
PDL waits for the previous kernel before it touches memory or returns, and that every launch passes
the kernel's PDL flag and the launch option together. The GPU side (same bits with and without
PDL over graph replays) is bench/check_kernels.py's `check_dependent_launch`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from vlserve_kernels import dependent_launch

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
# Memory operations (tl.load, tl.store, atomics, descriptor loads) and the reductions' loads.
_MEMORY_CALLS = {"load", "store", "atomic_add", "atomic_cas", "atomic_xchg", "_range_sums"}


def _jit_kernels(tree: ast.Module) -> list[ast.FunctionDef]:
    def is_jit(decorator: ast.expr) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return isinstance(target, ast.Attribute) and target.attr == "jit"
    return [node for node in tree.body if isinstance(node, ast.FunctionDef)
            and node.name.endswith("_kernel") and any(is_jit(d) for d in node.decorator_list)]


def _called_names(node: ast.AST) -> set[str]:
    names = set()
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        func = call.func
        names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


def _pdl_kernels() -> list[tuple[str, ast.FunctionDef]]:
    found = []
    for path in sorted(KERNELS_DIR.glob("*.py")):
        if path.name == "dependent_launch.py":   # the wait itself
            continue
        for kernel in _jit_kernels(ast.parse(path.read_text())):
            if any(arg.arg == "PDL" for arg in kernel.args.args):
                found.append((path.name, kernel))
    return found


def test_the_decode_path_kernels_take_pdl():
    names = {kernel.name for _, kernel in _pdl_kernels()}
    assert {"_linear_kernel", "_sum_partials_kernel", "_linear_tma_kernel", "_rms_norm_kernel",
            "_silu_and_mul_kernel", "_rotary_store_kv_kernel", "_rotary_kernel", "_store_kv_kernel",
            "_paged_attention_kernel"} <= names


@pytest.mark.parametrize("file_name,kernel", _pdl_kernels(), ids=lambda v: getattr(v, "name", v))
def test_kernel_waits_before_touching_memory(file_name, kernel):
    """Top-level statements before wait_previous_kernel(PDL) may compute indices, never load,
    store, take a ticket or return."""
    for statement in kernel.body:
        called = _called_names(statement)
        if "wait_previous_kernel" in called:
            return
        assert not any(isinstance(n, ast.Return) for n in ast.walk(statement)), f"{kernel.name}: return before the wait"
        touched = called & _MEMORY_CALLS
        assert not touched, f"{file_name} {kernel.name}: {sorted(touched)} before wait_previous_kernel"
    pytest.fail(f"{kernel.name} never calls wait_previous_kernel(PDL)")


def test_every_launch_passes_pdl_and_launch_pdl_together():
    launches = 0
    for path in sorted(KERNELS_DIR.glob("*.py")):
        for call in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)):
            if not (isinstance(call.func, ast.Subscript) and getattr(call.func.value, "id", "").endswith("_kernel")):
                continue
            keywords = {k.arg for k in call.keywords}
            if "PDL" in keywords or "launch_pdl" in keywords:
                launches += 1
                assert {"PDL", "launch_pdl"} <= keywords, f"{path.name}: {call.func.value.id} launch"
    assert launches >= 9


def test_pdl_is_off_on_the_cpu():
    assert not dependent_launch.enabled(torch.zeros(1))
