"""Causal attention of a ragged batch of query tokens over the paged KV cache (prefill chunks and
decodes mixed in one launch), with grouped-query heads.

Caller: `kernels.paged_attention` (dispatch in `kernels/__init__.py`), from the engine's attention
layer after `store_kv` has written this step's K/V.

Request r owns query rows [query_start_loc[r], query_start_loc[r+1]); they are the LAST q_len
positions of its seq_len-token sequence, so query i sits at absolute position
context_len + i (context_len = seq_len - q_len) and sees keys 0..context_len + i.
Its token t lives in the cache at (block_tables[r, t // block_size], t % block_size):

    block_tables[r] = [7, 2, 9]     block_size = 4, seq_len = 10
    tokens 0-3 -> block 7, tokens 4-7 -> block 2, tokens 8-9 -> block 9 (offsets 0, 1)

Query head h reads KV head h // (num_q_heads // num_kv_heads), as HF's repeat_kv does.
The torch `_reference` is the CPU backend: float32 math, matmul + softmax like HF eager attention.

Triton path, batch invariance: every query row walks its keys in fixed segments of
KV_SPLIT_TOKENS absolute positions (online softmax inside a segment, then an ordered merge of
segment results). Pure-decode batches with long sequences run the segments in parallel
(flash-decoding: one program per segment); each program stores its partial and takes a ticket on
its (token, kv head) counter, and the one drawing the row's last ticket merges all partials in
segment order and resets the counter (one launch, no separate merge kernel). Other batches run the
segments in a loop. Both perform the same arithmetic in the same order, and a row never depends on
which other requests share the launch or its tile.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

import vlserve_kernels.dependent_launch as dependent_launch
from vlserve_kernels.dependent_launch import wait_previous_kernel

from vlserve_kernels.rotary import _copy_heads, _rotate_heads, _token_cos_sin, store_kv_sections
from vlserve_kernels.ticket_counters import TicketCounters

# Query rows per matmul in the reference: bounds its score matrix to
# num_q_heads * _REFERENCE_QUERY_CHUNK * seq_len floats.
_REFERENCE_QUERY_CHUNK = 1024


def _reference(
    query: torch.Tensor,            # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,          # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,          # [num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,         # [num_reqs] int32
    block_tables: torch.Tensor,     # [num_reqs, max_blocks_per_req] int32
    scale: float,
    out: torch.Tensor,              # [num_tokens, num_q_heads, head_dim], written in place
    query_lens_cpu: list[int] | None,
    seq_lens_cpu: list[int] | None,
) -> torch.Tensor:
    starts = query_start_loc.tolist()
    if query_lens_cpu is None:
        query_lens_cpu = [b - a for a, b in zip(starts[:-1], starts[1:])]
    if seq_lens_cpu is None:
        seq_lens_cpu = seq_lens.tolist()
    for r, (q_len, seq_len) in enumerate(zip(query_lens_cpu, seq_lens_cpu)):
        keys, values = _gather_sequence_kv(k_cache, v_cache, block_tables[r], seq_len)
        q = query[starts[r] : starts[r] + q_len]            # [q_len, num_q_heads, head_dim]
        out[starts[r] : starts[r] + q_len] = _attend_one_request(q, keys, values, scale).to(out.dtype)
    out[starts[-1] :] = 0
    return out


def _gather_sequence_kv(k_cache, v_cache, block_table, seq_len: int):
    block_size = k_cache.shape[1]
    block_ids = block_table[: -(-seq_len // block_size)].long()   # [num_seq_blocks]
    keys = k_cache[block_ids].flatten(0, 1)[:seq_len]              # [seq_len, num_kv_heads, head_dim]
    values = v_cache[block_ids].flatten(0, 1)[:seq_len]
    return keys, values


def _attend_one_request(
    q: torch.Tensor,       # [q_len, num_q_heads, head_dim]
    keys: torch.Tensor,    # [seq_len, num_kv_heads, head_dim]
    values: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    scale: float,
) -> torch.Tensor:         # [q_len, num_q_heads, head_dim] float32
    q_len, num_q_heads, head_dim = q.shape
    seq_len, num_kv_heads, _ = keys.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_q_heads // num_kv_heads
    # Fold the query heads sharing a KV head into the row dimension instead of repeating K/V.
    q = q.float().permute(1, 0, 2).reshape(num_kv_heads, group, q_len, head_dim)
    k = keys.float().permute(1, 2, 0)                      # [num_kv_heads, head_dim, seq_len]
    v = values.float().permute(1, 0, 2)                    # [num_kv_heads, seq_len, head_dim]
    context_len = seq_len - q_len
    key_pos = torch.arange(seq_len, device=q.device)
    out = torch.empty(num_kv_heads, group, q_len, head_dim, dtype=torch.float32, device=q.device)
    for lo in range(0, q_len, _REFERENCE_QUERY_CHUNK):
        hi = min(q_len, lo + _REFERENCE_QUERY_CHUNK)
        query_pos = torch.arange(context_len + lo, context_len + hi, device=q.device)
        is_future = key_pos[None, :] > query_pos[:, None]              # [hi - lo, seq_len]
        scores = torch.matmul(q[:, :, lo:hi], k[:, None]) * scale       # [kv, group, hi - lo, seq_len]
        scores = scores.masked_fill(is_future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[:, :, lo:hi] = torch.matmul(probs, v[:, None])
    return out.reshape(num_q_heads, q_len, head_dim).permute(1, 0, 2)


# Tokens per KV segment: fixed, so a row's reduction order depends only on its own sequence; the
# split (decode) and looped (prefill / mixed) paths must walk the same segments to agree bit for bit.
# Why 256 (4 BLOCK_N steps of 64 on the GPU): smaller segments buy decode parallelism (batch 1,
# 900-token context, 2 KV heads: 4 working programs at 512, 8 at 256, 16 at 128), but each segment
# costs the looped path one more merge (about 3 passes over its [BLOCK_M, head_dim] accumulator) and
# at 128 leaves the inner key loop only 2 steps, too short to software-pipeline (num_stages 3). The
# split path's partials grow as max_seq_len / KV_SPLIT_TOKENS: decode graphs are captured at
# max_seq_len 8192, i.e. 32 segments x num_q_heads x (head_dim + 2) floats per token
# (Qwen2.5-VL-3B: 260 KiB per token, 65 MiB for a 256-sequence bucket; twice that at 128).
KV_SPLIT_TOKENS = 256
_NO_SCORE = tl.constexpr(-1.0e30)   # finite "minus infinity" for running maxima: keeps exp(m_old - m_new) NaN-free
_IS_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"   # what triton.jit saw at import


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, tile, BLOCK_Q: tl.constexpr):
    """Request r owns tiles from query_start_loc[r] // BLOCK_Q + r on (at least cdiv(q_len, BLOCK_Q)
    of them, at most one spare), so a grid of num_tokens // BLOCK_Q + num_reqs covers every row."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid, cache_modifier=".cg") // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _merge_segment(run_max, run_sum, run_acc, seg_max, seg_sum, seg_acc):
    """Fold one segment's (max, sum, acc) into the running result; the looped path and the split
    path's last program both use this, in segment order."""
    new_max = tl.maximum(run_max, seg_max)
    old_weight = tl.exp(run_max - new_max)
    seg_weight = tl.exp(seg_max - new_max)
    run_sum = run_sum * old_weight + seg_sum * seg_weight
    run_acc = run_acc * old_weight[:, None] + seg_acc * seg_weight[:, None]
    return new_max, run_sum, run_acc


@triton.jit
def _attend_segment(q, row_pos, k_cache_ptr, v_cache_ptr, block_table, kv_head, seg_start, seg_end, scale,
                    dims, dim_valid, stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIM_PADDED: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of the tile's rows over keys [seg_start, seg_end), BLOCK_N keys at a time."""
    seg_max = tl.full([BLOCK_M], _NO_SCORE, tl.float32)
    seg_sum = tl.zeros([BLOCK_M], tl.float32)
    seg_acc = tl.zeros([BLOCK_M, DIM_PADDED], tl.float32)
    for start in range(seg_start, seg_end, BLOCK_N):
        key_pos = start + tl.arange(0, BLOCK_N)                                     # [BLOCK_N]
        key_valid = key_pos < seg_end
        block_id = tl.load(block_table + key_pos // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        offset = key_pos % BLOCK_SIZE
        k_t = tl.load(k_cache_ptr + block_id[None, :] * stride_kc_b + offset[None, :] * stride_kc_s
                      + kv_head * stride_kc_h + dims[:, None],
                      mask=key_valid[None, :] & dim_valid[:, None], other=0.0)       # [DIM_PADDED, BLOCK_N]
        v = tl.load(v_cache_ptr + block_id[:, None] * stride_vc_b + offset[:, None] * stride_vc_s
                    + kv_head * stride_vc_h + dims[None, :],
                    mask=key_valid[:, None] & dim_valid[None, :], other=0.0)         # [BLOCK_N, DIM_PADDED]
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale              # [BLOCK_M, BLOCK_N]
        visible = (key_pos[None, :] <= row_pos[:, None]) & key_valid[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(seg_max, tl.max(scores, axis=1))
        rescale = tl.exp(seg_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        seg_sum = seg_sum * rescale + tl.sum(probs, axis=1)
        seg_acc = seg_acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        seg_max = new_max
    return seg_max, seg_sum, seg_acc


@triton.jit
def _store_rows(out_ptrs, run_sum, run_acc, row_mask):
    """out_ptrs [BLOCK_M, DIM_PADDED] <- acc / sum, the softmax-weighted values of each row."""
    tl.store(out_ptrs, (run_acc / run_sum[:, None]).to(out_ptrs.dtype.element_ty), mask=row_mask)


@triton.jit
def _merge_token_rows(num_segments, out_base, max_base, sum_base, acc_base, stride_o_h, stride_pm_h, stride_pa_h,
                      group, head_dim, MERGE_ROWS: tl.constexpr, DIM_PADDED: tl.constexpr):
    """_merge_tile_rows' merge on the token's `group` query-head rows only ([MERGE_ROWS,
    DIM_PADDED], MERGE_ROWS = group padded), not the program's 64-row tile of which the rest is
    padding: the merge is elementwise per row, so each row gets the same bits with an eighth of the
    instructions (Nsight Compute, H200: the split launch is bound by one warp per scheduler issuing
    ~3,770 instructions). *_base point at head 0 of the token's KV head group."""
    heads = tl.arange(0, MERGE_ROWS)
    dims = tl.arange(0, DIM_PADDED)
    valid = heads < group
    merged_max = tl.full([MERGE_ROWS], _NO_SCORE, tl.float32)
    merged_sum = tl.zeros([MERGE_ROWS], tl.float32)
    merged_acc = tl.zeros([MERGE_ROWS, DIM_PADDED], tl.float32)
    for s in range(0, num_segments):
        # .cg: read L2; this SM's L1 is not coherent and may hold stale lines of these buffers.
        seg_max = tl.load(max_base + heads * stride_pm_h + s, mask=valid, other=_NO_SCORE, cache_modifier=".cg")
        seg_sum = tl.load(sum_base + heads * stride_pm_h + s, mask=valid, other=1.0, cache_modifier=".cg")
        seg_acc = tl.load(acc_base + heads[:, None] * stride_pa_h + s * DIM_PADDED + dims[None, :],
                          mask=valid[:, None], other=0.0, cache_modifier=".cg")
        merged_max, merged_sum, merged_acc = _merge_segment(merged_max, merged_sum, merged_acc,
                                                            seg_max, seg_sum, seg_acc)
    _store_rows(out_base + heads[:, None] * stride_o_h + dims[None, :], merged_sum, merged_acc,
                valid[:, None] & (dims < head_dim)[None, :])


@triton.jit
def _store_partial_take_ticket(run_max, run_sum, run_acc, seg, num_segments, ticket_ptr, partial_max_ptrs,
                               partial_sum_ptrs, partial_acc_ptrs, row_valid, DIM_PADDED: tl.constexpr):
    """Split mode: store segment `seg`'s partial of the tile's rows and take a ticket on the
    (token, kv head) counter: True for the program drawing ticket num_segments - 1 (the last of the
    row's active segments), which then merges segments 0..num_segments-1 in order, writes out and
    resets the counter. partial_max_ptrs / partial_sum_ptrs [BLOCK_M] and partial_acc_ptrs
    [BLOCK_M, DIM_PADDED] point at segment 0; segments are contiguous (acc: DIM_PADDED floats apart)."""
    tl.store(partial_max_ptrs + seg, run_max, mask=row_valid)
    tl.store(partial_sum_ptrs + seg, run_sum, mask=row_valid)
    # The acc partials span all DIM_PADDED columns: a row-only mask keeps their accesses vectorized.
    tl.store(partial_acc_ptrs + seg * DIM_PADDED, run_acc, mask=row_valid[:, None])
    # The ticket is one thread's atomic: the barrier orders every thread's partial stores before it
    # (as CUTLASS's semaphore release does); acq_rel at GPU scope publishes them to the last program
    # and, in the last program, acquires the others' (Triton broadcasts the result through a barrier).
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    return ticket == num_segments - 1


@triton.jit
def _merge_tile_rows(num_segments, out_ptrs, partial_max_ptrs, partial_sum_ptrs, partial_acc_ptrs, row_valid,
                     row_mask, BLOCK_M: tl.constexpr, DIM_PADDED: tl.constexpr):
    """The last program's merge of segments 0..num_segments-1, in order, on the program's tile."""
    merged_max = tl.full([BLOCK_M], _NO_SCORE, tl.float32)
    merged_sum = tl.zeros([BLOCK_M], tl.float32)
    merged_acc = tl.zeros([BLOCK_M, DIM_PADDED], tl.float32)
    for s in range(0, num_segments):
        # .cg: read L2; this SM's L1 is not coherent and may hold stale lines of these buffers.
        seg_max = tl.load(partial_max_ptrs + s, mask=row_valid, other=_NO_SCORE, cache_modifier=".cg")
        seg_sum = tl.load(partial_sum_ptrs + s, mask=row_valid, other=1.0, cache_modifier=".cg")
        seg_acc = tl.load(partial_acc_ptrs + s * DIM_PADDED, mask=row_valid[:, None], other=0.0,
                          cache_modifier=".cg")
        merged_max, merged_sum, merged_acc = _merge_segment(merged_max, merged_sum, merged_acc,
                                                            seg_max, seg_sum, seg_acc)
    _store_rows(out_ptrs, merged_sum, merged_acc, row_mask)


@triton.jit
def _rotate_own_token(query_ptr, key_ptr, value_ptr, query_out_ptr, k_cache_ptr, v_cache_ptr, token, slot, kv_head,
                      half, stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
                      stride_qo_t, stride_qo_h, stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s,
                      stride_vc_h, cos, sin, writes_kv, GROUP: tl.constexpr, GROUP_PADDED: tl.constexpr,
                      HALF_PADDED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """FUSED_ROTARY (one decode token per program): rotary_store_kv's work for this KV head, done by
    its helpers so the bits are the same: the GROUP query heads rotated into query_out, and, by the
    program whose segment holds the token (writes_kv), the rotated key and the value into its slot.
    The caller's barrier then orders these stores before the program's own loads of them."""
    first_head = kv_head * GROUP
    _rotate_heads(query_ptr + first_head * stride_q_h, query_out_ptr + first_head * stride_qo_h, token, GROUP, half,
                  stride_q_t, stride_q_h, stride_qo_t, stride_qo_h, cos, sin, GROUP_PADDED, HALF_PADDED)
    if writes_kv & (slot >= 0):
        block_id, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        k_dst = k_cache_ptr + block_id * stride_kc_b + offset * stride_kc_s + kv_head * stride_kc_h
        v_dst = v_cache_ptr + block_id * stride_vc_b + offset * stride_vc_s + kv_head * stride_vc_h
        _rotate_heads(key_ptr + kv_head * stride_k_h, k_dst, token, 1, half, stride_k_t, stride_k_h,
                      0, stride_kc_h, cos, sin, 1, HALF_PADDED)
        _copy_heads(value_ptr + token * stride_v_t + kv_head * stride_v_h, v_dst, 1, 2 * half, stride_v_h,
                    stride_vc_h, 1, 2 * HALF_PADDED)


# num_reqs, the block table's width and the M-RoPE positions' row stride change from step to step:
# specialised (== 1, divisible by 16), a new value would compile another kernel in the middle of serving.
@triton.jit(do_not_specialize=["num_reqs", "stride_bt_r", "stride_pos_row"])
def _paged_attention_kernel(
    query_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr, tickets_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr, scale, num_reqs, head_dim,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
    stride_bt_r, stride_pa_t, stride_pa_h, stride_pm_t, stride_pm_h,
    # FUSED_ROTARY only (rotary_store_kv's arguments; query_ptr is then the unrotated query):
    key_ptr, value_ptr, query_out_ptr, slot_mapping_ptr, positions_ptr, cos_sin_ptr, half,
    section_0, section_1, section_2, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_qo_t, stride_qo_h,
    stride_pos_row, stride_cache,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DIM_PADDED: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLIT_TOKENS: tl.constexpr,
    IS_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
    FUSED_ROTARY: tl.constexpr, IS_MROPE: tl.constexpr, IS_INTERLEAVED: tl.constexpr,
    GROUP_PADDED: tl.constexpr, HALF_PADDED: tl.constexpr, MERGE_ROWS: tl.constexpr = 0,
):
    # Program (query tile, kv head[, segment when IS_SPLIT]).
    # The step's request metadata is written before its first kernel, so it is read before the wait
    # (dependent_launch's rule): the binary search and these loads overlap the previous kernel, and
    # after the wait only q and this step's K/V remain on the critical path.
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = _find_request(query_start_loc_ptr, num_reqs, tile, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req, cache_modifier=".cg")
    q_len = tl.load(query_start_loc_ptr + req + 1, cache_modifier=".cg") - q_start
    seq_len = tl.load(seq_lens_ptr + req, cache_modifier=".cg")
    if FUSED_ROTARY:   # pure decode: the tile's one token; a padding request (q_len 0) reads token 0's rows
        token = tl.where(q_len > 0, q_start, 0).to(tl.int64)
        cos, sin = _token_cos_sin(positions_ptr, cos_sin_ptr, token, half, section_0, section_1, section_2,
                                  stride_pos_row, stride_cache, IS_MROPE, IS_INTERLEAVED, HALF_PADDED)
        slot = tl.load(slot_mapping_ptr + token, cache_modifier=".cg").to(tl.int64)
    wait_previous_kernel(PDL)
    tile_local = tile - (q_start // BLOCK_Q + req)
    if tile_local * BLOCK_Q >= q_len:
        return
    kv_end = tl.minimum(seq_len, seq_len - q_len + (tile_local + 1) * BLOCK_Q)
    num_segments = (kv_end + SPLIT_TOKENS - 1) // SPLIT_TOKENS
    seg_first = 0
    seg_last = num_segments
    if IS_SPLIT:   # programs of segments past the sequence exit before any other load, ticketless
        seg_first = tl.program_id(2)
        seg_last = seg_first + 1
        if seg_first >= num_segments:
            return
    q_src, stride_src_t, stride_src_h = query_ptr, stride_q_t, stride_q_h
    if FUSED_ROTARY:
        _rotate_own_token(query_ptr, key_ptr, value_ptr, query_out_ptr, k_cache_ptr, v_cache_ptr, token, slot, kv_head,
                          half, stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
                          stride_qo_t, stride_qo_h, stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s,
                          stride_vc_h, cos, sin, seg_last == num_segments, GROUP, GROUP_PADDED, HALF_PADDED,
                          BLOCK_SIZE)
        tl.debug_barrier()   # every thread's stores above before any thread's loads below
        q_src, stride_src_t, stride_src_h = query_out_ptr, stride_qo_t, stride_qo_h
    # Row m = query token tile_local * BLOCK_Q + m // GROUP of the request, query head kv_head * GROUP + m % GROUP.
    rows = tl.arange(0, BLOCK_M)
    row_tok = tile_local * BLOCK_Q + rows // GROUP                                   # [BLOCK_M]
    row_head = kv_head * GROUP + rows % GROUP                                        # [BLOCK_M]
    row_valid = (rows < BLOCK_Q * GROUP) & (row_tok < q_len)
    row_pos = seq_len - q_len + row_tok                                              # [BLOCK_M] absolute
    row_t64 = (q_start + row_tok).to(tl.int64)
    dims = tl.arange(0, DIM_PADDED)
    dim_valid = dims < head_dim
    row_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(q_src + row_t64[:, None] * stride_src_t + row_head[:, None] * stride_src_h + dims[None, :],
                mask=row_mask, other=0.0, cache_modifier=".cg")                      # [BLOCK_M, DIM_PADDED]
    run_max = tl.full([BLOCK_M], _NO_SCORE, tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    run_acc = tl.zeros([BLOCK_M, DIM_PADDED], tl.float32)
    block_table = block_tables_ptr + req.to(tl.int64) * stride_bt_r
    for seg in range(seg_first, seg_last):
        seg_max, seg_sum, seg_acc = _attend_segment(
            q, row_pos, k_cache_ptr, v_cache_ptr, block_table, kv_head, seg * SPLIT_TOKENS,
            tl.minimum((seg + 1) * SPLIT_TOKENS, kv_end), scale, dims, dim_valid,
            stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
            BLOCK_M, BLOCK_N, DIM_PADDED, BLOCK_SIZE, DOT_PRECISION)
        run_max, run_sum, run_acc = _merge_segment(run_max, run_sum, run_acc, seg_max, seg_sum, seg_acc)
    out_ptrs = out_ptr + row_t64[:, None] * stride_o_t + row_head[:, None] * stride_o_h + dims[None, :]
    # A one-segment row needs no merge: folding its single partial into the empty state is exact.
    if IS_SPLIT:
        if num_segments > 1:   # split mode: one token per tile, so its counter is (token q_start, kv_head)
            ticket_ptr = tickets_ptr + q_start * tl.num_programs(1) + kv_head
            partial_max_ptrs = partial_max_ptr + row_t64 * stride_pm_t + row_head * stride_pm_h
            partial_sum_ptrs = partial_sum_ptr + row_t64 * stride_pm_t + row_head * stride_pm_h
            partial_acc_ptrs = (partial_acc_ptr + row_t64[:, None] * stride_pa_t + row_head[:, None] * stride_pa_h
                                + dims[None, :])
            if _store_partial_take_ticket(run_max, run_sum, run_acc, seg_first, num_segments, ticket_ptr,
                                          partial_max_ptrs, partial_sum_ptrs, partial_acc_ptrs, row_valid, DIM_PADDED):
                if MERGE_ROWS > 0:   # on the token's query heads only (AttentionLaunch.merge_rows)
                    token, head0 = q_start.to(tl.int64), kv_head * GROUP
                    _merge_token_rows(num_segments, out_ptr + token * stride_o_t + head0 * stride_o_h,
                                      partial_max_ptr + token * stride_pm_t + head0 * stride_pm_h,
                                      partial_sum_ptr + token * stride_pm_t + head0 * stride_pm_h,
                                      partial_acc_ptr + token * stride_pa_t + head0 * stride_pa_h,
                                      stride_o_h, stride_pm_h, stride_pa_h, GROUP, head_dim, MERGE_ROWS, DIM_PADDED)
                else:
                    _merge_tile_rows(num_segments, out_ptrs, partial_max_ptrs, partial_sum_ptrs, partial_acc_ptrs,
                                     row_valid, row_mask, BLOCK_M, DIM_PADDED)
                tl.store(ticket_ptr, 0)   # every ticket of the row is drawn: zero for the next launch / replay
        else:
            _store_rows(out_ptrs, run_sum, run_acc, row_mask)
    else:
        _store_rows(out_ptrs, run_sum, run_acc, row_mask)


@dataclass(frozen=True)
class AttentionLaunch:
    """How the kernel is launched. kv_split (the segment, see KV_SPLIT_TOKENS), block_n and num_warps
    change a row's arithmetic (segment bounds, the online-softmax step, the layout of its row sums),
    so the split and looped paths share them; the rest only picks between two equal computations
    (split_below: pure-decode launches with fewer than this many (request, KV head) pairs run the
    segments in parallel; larger batches fill the GPU with the looped path) or overlaps loads with
    math (pipeline depths). bench/tune_decode.py sweeps these; kernels/attention_launch.json holds
    each GPU model's choice, picked from that sweep and an engine A/B (BENCHMARKS.md, seventh session)."""

    kv_split: int = KV_SPLIT_TOKENS
    block_n: int = 64
    num_warps: int = 4
    split_stages: int = 3   # flash-decoding programs (pure decode, long sequences)
    loop_stages: int = 3    # every other launch (prefill chunks, mixed steps, short decodes)
    split_below: int = 1 << 30
    # Split decode launches (is_split_launch) do rotary_store_kv's work too: one launch less per layer. Not
    # the looped path: there the rotation sits on every program's critical path (H200: bucket 1 -23 us per
    # step, bucket 64 +13 us when looped launches fused too; BENCHMARKS.md, tenth session). Also summing
    # the qkv product's K ranges in this launch (no second launch) was measured: +72 us at bucket 1.
    fuse_rotary: bool = False
    # Split launches: the last program merges the segments on the token's query-head rows (a [group,
    # head_dim] tile, _merge_token_rows) instead of the program's 64-row tile. Elementwise: the same bits
    # (interpreter test; bench/check_kernels.py on a GPU). ptxas for sm_90a: spills 2.5 KB -> 0.3 KB, the
    # code after the ticket 3,374 -> 1,425 PTX lines. H200 (thirteenth session, bench/step_time.py --tokens 520):
    # batch-1 decode step 2,420 -> 2,281 us, bucket 64 unchanged, W2 2.50 -> 2.43 ms/token; the H200 table sets it.
    merge_rows: bool = False
    # Measured on the H200 and not kept (BENCHMARKS.md, eleventh session; all bit-equal): the split path's
    # last program merging 4 segments' partials per load on the token's 8 query-head rows (+650 us per
    # batch-1 step at 550 tokens, though ptxas showed 0.3 KB of spills instead of 2.5 KB), and split
    # launches on a 16-row tile (the token's 8 heads) run by 1 warp (+266 us; with 2 or 4 warps the tile's
    # bits differed from the 64-row tile's in some launches).


DEFAULT_LAUNCH = AttentionLaunch()
_TUNED_PATH = Path(__file__).with_name("attention_launch.json")


@functools.lru_cache(maxsize=None)
def tuned_launch(device_name: str) -> AttentionLaunch:
    """The GPU model's launch from kernels/attention_launch.json, else DEFAULT_LAUNCH."""
    table = json.loads(_TUNED_PATH.read_text()) if _TUNED_PATH.exists() else {}
    entry = table.get(device_name)
    return AttentionLaunch(**entry) if entry else DEFAULT_LAUNCH


@functools.lru_cache(maxsize=None)
def launch_for(device: torch.device) -> AttentionLaunch:
    # Per device, once: the kernel runs per layer per step, the name lookup need not.
    return tuned_launch(torch.cuda.get_device_name(device)) if device.type == "cuda" else DEFAULT_LAUNCH


def is_split_launch(launch: AttentionLaunch, max_query_len: int, max_seq_len: int, num_reqs: int, num_kv_heads: int,
                    kv_split_tokens: int | None = None) -> bool:
    """Pure-decode launches with long sequences and few (request, KV head) pairs run one program per
    KV segment (flash-decoding), merged in-kernel; others loop over the segments."""
    return (max_query_len == 1 and max_seq_len > (kv_split_tokens or launch.kv_split)
            and num_reqs * num_kv_heads < launch.split_below)


def _tile_shape(group: int, block_n: int) -> tuple[int, int, int]:
    """(BLOCK_Q query tokens, BLOCK_M rows = BLOCK_Q * group padded, BLOCK_N keys) per program.
    Fixed per (group, mode), never per batch, so tiling never changes a row's arithmetic."""
    target_rows, block_n = (16, 16) if _IS_INTERPRETING else (64, block_n)
    block_q = max(1, target_rows // group)
    return block_q, max(16, triton.next_power_of_2(block_q * group)), block_n


# Split-mode ticket counters, one per (token, KV head) of a launch (kernels/ticket_counters.py).
TICKETS = TicketCounters("paged attention (split-KV merge)", 1024)


@dataclass(frozen=True)
class DecodeRotary:
    """rotary_store_kv's inputs, for the decode launch that does its work itself (FUSED_ROTARY):
    the attention's query is then unrotated, and key / value are this step's, not yet cached."""

    key: torch.Tensor             # [num_tokens, num_kv_heads, head_dim], unrotated
    value: torch.Tensor           # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor       # [num_tokens] or [3, num_tokens] int64
    cos_sin_cache: torch.Tensor   # [max_position, head_dim]
    slot_mapping: torch.Tensor    # [num_tokens] int64; -1 = padding, skipped
    mrope_section: list[int] | None
    interleaved: bool


def _rotary_arguments(query, k_cache, v_cache, rotary: DecodeRotary | None):
    """(the kernel's FUSED_ROTARY arguments, its constexprs); dummies without rotary. The rotated
    query goes to a scratch tensor (query_out) that each program reads back its own rows from."""
    if rotary is None:
        return [query] * 6 + [0] * 12, dict(
            FUSED_ROTARY=False, IS_MROPE=False, IS_INTERLEAVED=False, GROUP_PADDED=1, HALF_PADDED=1)
    sections = store_kv_sections(query, rotary.key, rotary.value, rotary.positions, rotary.cos_sin_cache,
                                 k_cache, v_cache, rotary.mrope_section)
    query_out, positions = torch.empty_like(query), rotary.positions
    head_dim, group = query.shape[2], query.shape[1] // k_cache.shape[2]
    args = [rotary.key, rotary.value, query_out, rotary.slot_mapping, positions, rotary.cos_sin_cache,
            head_dim // 2, *sections, rotary.key.stride(0), rotary.key.stride(1), rotary.value.stride(0),
            rotary.value.stride(1), query_out.stride(0), query_out.stride(1),
            positions.stride(0) if positions.dim() == 2 else 0, rotary.cos_sin_cache.stride(0)]
    return args, dict(
        FUSED_ROTARY=True, IS_MROPE=rotary.mrope_section is not None, IS_INTERLEAVED=rotary.interleaved,
        GROUP_PADDED=triton.next_power_of_2(group), HALF_PADDED=triton.next_power_of_2(head_dim // 2))


def _triton(query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
            max_query_len, max_seq_len, out, query_lens_cpu, kv_split_tokens: int | None = None,
            launch: AttentionLaunch | None = None, rotary: DecodeRotary | None = None):
    """rotary (decode launches only, max_query_len 1): query is unrotated and the launch does
    rotary_store_kv's work too (the same bits as that call followed by this one)."""
    num_tokens, num_q_heads, head_dim = query.shape
    if rotary is not None and max_query_len != 1:
        raise ValueError(f"the rotary is fused into decode launches only (max_query_len 1, got {max_query_len})")
    num_kv_heads, num_reqs = k_cache.shape[2], query_start_loc.shape[0] - 1
    _zero_padding_rows(out, query_lens_cpu)
    if num_tokens == 0 or num_reqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    if launch is None:
        launch = launch_for(query.device)
    kv_split_tokens = kv_split_tokens or launch.kv_split
    block_q, block_m, block_n = _tile_shape(group, launch.block_n)
    if kv_split_tokens % block_n:
        raise ValueError(f"kv_split_tokens {kv_split_tokens} must be a multiple of {block_n}")
    dim_padded = max(16, triton.next_power_of_2(head_dim))
    is_split = is_split_launch(launch, max_query_len, max_seq_len, num_reqs, num_kv_heads, kv_split_tokens)
    num_segments = triton.cdiv(max_seq_len, kv_split_tokens) if is_split else 1
    partial_rows = (num_tokens, num_q_heads, num_segments) if is_split else (1, 1, 1)
    partial_acc = query.new_empty((*partial_rows, dim_padded), dtype=torch.float32)
    partial_max = query.new_empty(partial_rows, dtype=torch.float32)
    partial_sum = torch.empty_like(partial_max)
    # Counters [num_tokens x num_kv_heads] for split launches; other launches never touch the pointer.
    tickets = TICKETS.get(query.device, num_tokens * num_kv_heads) if is_split else partial_max
    rotary_args, rotary_constexprs = _rotary_arguments(query, k_cache, v_cache, rotary)
    _paged_attention_kernel[(num_tokens // block_q + num_reqs, num_kv_heads, num_segments)](
        query, k_cache, v_cache, out, partial_acc, partial_max, partial_sum, tickets,
        query_start_loc, seq_lens, block_tables, scale, num_reqs, head_dim,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), partial_acc.stride(0), partial_acc.stride(1),
        partial_max.stride(0), partial_max.stride(1), *rotary_args, **rotary_constexprs,
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, DIM_PADDED=dim_padded,
        BLOCK_SIZE=k_cache.shape[1], SPLIT_TOKENS=kv_split_tokens, IS_SPLIT=is_split,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        PDL=(pdl := dependent_launch.enabled(query)), launch_pdl=pdl, num_warps=launch.num_warps,
        num_stages=launch.split_stages if is_split else launch.loop_stages,
        MERGE_ROWS=triton.next_power_of_2(group) if is_split and launch.merge_rows else 0)
    return out


def _zero_padding_rows(out: torch.Tensor, query_lens_cpu: list[int] | None) -> None:
    """Rows past query_start_loc[-1] must read 0; without host lengths, clear everything first."""
    if query_lens_cpu is None:
        out.zero_()
    else:
        out[sum(query_lens_cpu):].zero_()
