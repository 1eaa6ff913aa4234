"""Kernel arguments whose values change from step to step (token and request counts, the M-RoPE
positions' row stride, the block table's width) are not specialised by Triton. A specialised integer
gets its own compiled kernel for 1 and for multiples of 16, so a new value met while serving compiles
a kernel in the middle of a step and stalls the engine (a py-spy of the served image-chat load on the
H200 caught `_rotary_store_kv_kernel` compiling in an eager step). Values fixed by the model (hidden
size, head counts, weight strides) stay specialised: their loads vectorise on it."""

from __future__ import annotations

import importlib

import pytest

STEP_VARYING = [
    ("vlserve_kernels.matmul", "_linear_kernel", ["M", "NUM_SPLITS"]),
    ("vlserve_kernels.matmul", "_sum_partials_kernel", ["M", "NUM_SPLITS"]),
    ("vlserve_kernels.matmul_tma", "_linear_tma_kernel", ["M", "NUM_SPLITS", "num_programs"]),
    ("vlserve_kernels.linear_norm", "_sum_add_norm_kernel", ["M", "NUM_SPLITS"]),
    ("vlserve_kernels.paged_attention", "_paged_attention_kernel", ["num_reqs", "stride_bt_r"]),
    ("vlserve_kernels.rotary", "_rotary_kernel", ["stride_pos_row"]),
    ("vlserve_kernels.rotary", "_rotary_store_kv_kernel", ["stride_pos_row"]),
]


@pytest.mark.parametrize("module,kernel,names", STEP_VARYING)
def test_step_varying_arguments_are_not_specialised(module, kernel, names):
    params = {param.name: param for param in getattr(importlib.import_module(module), kernel).params}
    assert set(names) <= set(params), f"{kernel} has no argument {set(names) - set(params)}"
    specialised = [name for name in names if not params[name].do_not_specialize]
    assert not specialised, f"{kernel} specialises {specialised}, which change from step to step"
