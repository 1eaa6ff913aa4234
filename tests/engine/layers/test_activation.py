"""SiluAndMul.of_projection: the MLP's gate_up + SiLU-and-mul, one fused call in deterministic mode
(kernels.batch_invariant_linear_silu_mul; its Triton kernel is checked bit for bit in
tests/kernels/interpreted/matmul_cases.py), against HF's act_fn(gate(x)) * up(x)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import vlserve_kernels as kernels
from engine.layers.activation import SiluAndMul
from engine.layers.linear import MergedLinear, set_batch_invariant
from engine.models.qwen2 import Qwen2MLP


def _gate_up(dtype: torch.dtype) -> tuple[MergedLinear, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    layer = MergedLinear(10, [7, 7]).to(dtype)
    gate, up = torch.randn(7, 10, generator=gen).to(dtype), torch.randn(7, 10, generator=gen).to(dtype)
    layer.weight.weight_loader(layer.weight, gate, 0)
    layer.weight.weight_loader(layer.weight, up, 1)
    return layer, gate, up


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_of_projection_is_hf_act_fn_of_gate_times_up(batch_invariant, monkeypatch):
    layer, gate, up = _gate_up(torch.bfloat16)
    layer.batch_invariant = batch_invariant
    fused_calls = []
    fused = kernels.batch_invariant_linear_silu_mul
    monkeypatch.setattr(kernels, "batch_invariant_linear_silu_mul", lambda *a: fused_calls.append(1) or fused(*a))
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = SiluAndMul().of_projection(layer, x)
    assert torch.equal(got, F.silu(F.linear(x, gate)) * F.linear(x, up))     # HF Qwen2MLP, bf16 rounding
    assert len(fused_calls) == int(batch_invariant)


def test_of_projection_needs_equal_gate_and_up():
    with pytest.raises(ValueError, match="not \\[I, I\\]"):
        SiluAndMul().of_projection(MergedLinear(10, [7, 5]), torch.randn(2, 10))


def test_qwen2_mlp_uses_the_fused_call_in_deterministic_mode(monkeypatch):
    config = SimpleNamespace(hidden_act="silu", hidden_size=10, intermediate_size=6)
    mlp = Qwen2MLP(config)
    for param in mlp.parameters():
        param.data.normal_(generator=torch.Generator().manual_seed(2))
    x = torch.randn(3, 10)
    plain = mlp(x)
    calls = []
    fused = kernels.batch_invariant_linear_silu_mul
    monkeypatch.setattr(kernels, "batch_invariant_linear_silu_mul", lambda *a: calls.append(1) or fused(*a))
    set_batch_invariant(mlp, True)
    assert torch.equal(mlp(x), plain) and calls == [1]
