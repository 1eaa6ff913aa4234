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


# Pointers a kernel reads before its wait: memory that only launches before the step's first layer
# write (request metadata, positions, slots) or none (the cos/sin table). The callers' contract
# (kernels/__init__.py) says the launch just before never writes them.
PREWAIT_READS = {
    "_paged_attention_kernel": {"query_start_loc_ptr", "seq_lens_ptr", "positions_ptr", "cos_sin_ptr",
                                "slot_mapping_ptr"},
    "_rotary_store_kv_kernel": {"positions_ptr", "cos_sin_ptr", "slot_mapping_ptr"},
}


def _pointer_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id.endswith("_ptr")}


@pytest.mark.parametrize("file_name,kernel", _pdl_kernels(), ids=lambda v: getattr(v, "name", v))
def test_kernel_waits_before_touching_memory(file_name, kernel):
    """Top-level statements before wait_previous_kernel(PDL) may compute indices and read the
    kernel's PREWAIT_READS pointers; never store, take a ticket, return, or read anything else."""
    allowed = PREWAIT_READS.get(kernel.name, set())
    for statement in kernel.body:
        called = _called_names(statement)
        if "wait_previous_kernel" in called:
            return
        assert not any(isinstance(n, ast.Return) for n in ast.walk(statement)), f"{kernel.name}: return before the wait"
        touched = called & (_MEMORY_CALLS - {"load"})
        assert not touched, f"{file_name} {kernel.name}: {sorted(touched)} before wait_previous_kernel"
        read = _pointer_names(statement) - allowed
        assert not read, f"{file_name} {kernel.name}: reads {sorted(read)} before wait_previous_kernel"
    pytest.fail(f"{kernel.name} never calls wait_previous_kernel(PDL)")


def test_checker_refuses_a_read_of_the_previous_kernels_output():
    source = ("@triton.jit\ndef _rotary_store_kv_kernel(query_ptr, positions_ptr, PDL: tl.constexpr):\n"
              "    p = tl.load(positions_ptr)\n    q = tl.load(query_ptr)\n    wait_previous_kernel(PDL)\n")
    kernel = _jit_kernels(ast.parse(source))[0]
    with pytest.raises(AssertionError, match=r"reads \['query_ptr'\]"):
        test_kernel_waits_before_touching_memory("x.py", kernel)


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
