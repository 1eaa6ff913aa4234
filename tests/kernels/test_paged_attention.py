"""kernels.paged_attention: the torch reference (the CPU backend) against dense causal attention
built by hand per request; the Triton kernel against the reference in the interpreter
(interpreted/paged_attention_cases.py, run in a child process)."""

from __future__ import annotations

import importlib

import pytest
import torch

import vlserve_kernels as kernels
from paged_batch import MIXED, dense_causal_attention, make_batch

# The package's `paged_attention` function shadows the submodule of the same name.
paged_attention_module = importlib.import_module("vlserve_kernels.paged_attention")


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (4, 2), (8, 2), (7, 1)])
@pytest.mark.parametrize("block_size", [1, 8, 16])
def test_reference_matches_dense_attention(num_q_heads, num_kv_heads, block_size):
    batch = make_batch(*MIXED, num_q_heads, num_kv_heads, 16, block_size, num_padding_tokens=2)
    out = kernels.paged_attention(**batch)
    torch.testing.assert_close(out.double(), dense_causal_attention(batch), rtol=1e-5, atol=1e-5)
    assert torch.all(out[-2:] == 0)


def test_reference_with_shared_blocks_and_host_lengths():
    batch = make_batch([2, 3], [20, 19], 4, 2, 8, 8, shared_prefix_blocks=2)
    out = torch.full_like(batch["query"], float("nan"))
    result = kernels.paged_attention(**batch, out=out, query_lens_cpu=[2, 3], seq_lens_cpu=[20, 19])
    assert result is out
    torch.testing.assert_close(out.double(), dense_causal_attention(batch), rtol=1e-5, atol=1e-5)


def test_reference_in_half_precision_returns_input_dtype():
    batch = make_batch(*MIXED, 4, 2, 16, 8, dtype=torch.bfloat16)
    out = kernels.paged_attention(**batch)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), dense_causal_attention(batch), rtol=1e-2, atol=1e-2)


def test_reference_chunks_long_queries(monkeypatch):
    monkeypatch.setattr(paged_attention_module, "_REFERENCE_QUERY_CHUNK", 3)
    batch = make_batch([7, 1], [10, 4], 4, 2, 8, 4)
    torch.testing.assert_close(kernels.paged_attention(**batch).double(), dense_causal_attention(batch),
                               rtol=1e-5, atol=1e-5)


def test_rejects_head_counts_that_do_not_group():
    batch = make_batch([1], [3], 3, 2, 8, 4)
    with pytest.raises(ValueError, match="num_q_heads"):
        kernels.paged_attention(**batch)


def test_triton_kernel_in_interpreter(run_interpreted_cases):
    run_interpreted_cases("paged_attention_cases.py")


def test_tuned_launch_reads_the_gpu_models_entry(tmp_path, monkeypatch):
    table = tmp_path / "attention_launch.json"
    table.write_text('{"GPU A": {"kv_split": 128, "split_stages": 2, "split_below": 64}}')
    monkeypatch.setattr(paged_attention_module, "_TUNED_PATH", table)
    paged_attention_module.tuned_launch.cache_clear()
    try:
        launch = paged_attention_module.tuned_launch("GPU A")
        assert (launch.kv_split, launch.split_stages, launch.split_below) == (128, 2, 64)
        assert launch.block_n == paged_attention_module.DEFAULT_LAUNCH.block_n
        assert paged_attention_module.tuned_launch("GPU B") == paged_attention_module.DEFAULT_LAUNCH
    finally:
        paged_attention_module.tuned_launch.cache_clear()
