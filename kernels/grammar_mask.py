"""Structured outputs: set the logits a grammar forbids to -inf, in place, for the given rows.

Caller: `kernels.apply_token_bitmask_inplace` (dispatch in `kernels/__init__.py`), from the engine's
sampler. The bitmask is the grammar libraries' layout (llguidance, xgrammar): int32 words
[num_masked_rows, ceil(vocab / 32)], bit j of word w set <=> token 32 * w + j is allowed. Tokens
past the mask's last word are forbidden; mask bits past the logits' width are ignored.

The Triton kernel is one pass: each program unpacks the words of one row's column block and stores
-inf where the bit is clear (allowed logits are neither read nor written). The torch reference
unpacks the words a byte at a time through a 256-entry table, then masks the rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# [256, 8] bool: bit j of byte value b.
_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1) == 1


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask [C, W] int32 -> allowed [C, vocab_size] bool (False past 32 * W)."""
    shifts = torch.arange(0, 32, 8, device=bitmask.device, dtype=torch.int32)
    byte_values = ((bitmask[:, :, None] >> shifts) & 0xFF).long()            # [C, W, 4], low byte first
    allowed = _BYTE_BITS.to(bitmask.device)[byte_values].flatten(1)          # [C, 32 * W]
    if allowed.shape[1] < vocab_size:
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]))
    return allowed[:, :vocab_size]


def _reference(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    # logits [R, V] float; rows [C] int64 (distinct) into R; bitmask [C, W] int32.
    forbidden = ~allowed_tokens(bitmask, logits.shape[1])                    # [C, V]
    if rows.shape[0] == logits.shape[0] and torch.equal(rows, torch.arange(rows.shape[0], device=rows.device)):
        logits.masked_fill_(forbidden, float("-inf"))   # every row, in order: no gather
        return
    masked = logits.index_select(0, rows).masked_fill_(forbidden, float("-inf"))
    logits.index_copy_(0, rows, masked)


@triton.jit
def _grammar_mask_kernel(logits_ptr, rows_ptr, bitmask_ptr, vocab_size, num_words, stride_logits,
                         stride_bitmask, BLOCK: tl.constexpr):
    # Program (masked row c, column block): logits[rows[c], cols] = -inf where the bit is clear.
    c = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + c).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    word_index = cols // 32
    words = tl.load(bitmask_ptr + c * stride_bitmask + word_index, mask=word_index < num_words, other=0)
    is_allowed = ((words >> (cols % 32).to(tl.int32)) & 1) != 0
    minus_inf = tl.full((BLOCK,), float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * stride_logits + cols, minus_inf, mask=(cols < vocab_size) & ~is_allowed)


def _triton(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    if logits.stride(1) != 1 or bitmask.stride(1) != 1:
        raise ValueError("logits and bitmask must be contiguous in the last dimension")
    if bitmask.dtype != torch.int32 or bitmask.shape[0] != rows.shape[0]:
        raise ValueError("bitmask must be int32 with one row per masked row")
    vocab_size, block = logits.shape[1], 4096
    if rows.shape[0]:
        _grammar_mask_kernel[(rows.shape[0], triton.cdiv(vocab_size, block))](
            logits, rows, bitmask, vocab_size, bitmask.shape[1], logits.stride(0), bitmask.stride(0), BLOCK=block)
