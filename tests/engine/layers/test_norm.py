"""engine.layers.norm.RMSNorm.of_projection: the norm of a row-parallel projection plus the residual,
fused in deterministic mode (kernels.batch_invariant_linear_add_rms_norm), equals the two steps."""

from __future__ import annotations

import torch

from engine.layers.linear import RowParallelLinear
from engine.layers.norm import RMSNorm


def test_of_projection_equals_projection_then_norm():
    gen = torch.Generator().manual_seed(0)
    projection, norm = RowParallelLinear(24, 16, bias=True), RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        for param in (projection.weight, projection.bias, norm.weight):
            param.copy_(torch.randn(param.shape, generator=gen))
    x, residual = torch.randn(5, 24, generator=gen), torch.randn(5, 16, generator=gen)
    want_normed, want_residual = norm(projection(x), residual)
    torch.testing.assert_close(want_residual, residual + x @ projection.weight.T + projection.bias)
    for batch_invariant in (False, True):
        projection.batch_invariant = batch_invariant
        normed, new_residual = norm.of_projection(projection, x, residual)
        assert torch.equal(normed, want_normed) and torch.equal(new_residual, want_residual)
