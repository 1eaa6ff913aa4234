"""GPU check of every Triton kernel at real sizes (Qwen2.5-VL-3B LM: 16 query heads, 2 KV heads,
head_dim 128, hidden 2048, intermediate 11008, block 16) in bfloat16 against the float32 torch
references; prints a table (time by triton.testing.do_bench, bandwidth for decode attention) and
exits 1 on any failure. Run on a CUDA machine: `python bench/check_kernels.py`. Not a pytest file.

Each case poisons its outputs with NaN before the checked run, so an unwritten element fails.
Also checks batch invariance: a decode row computed alone, in a decode batch (split-KV launch)
and in a mixed prefill+decode batch (looped-segment launch) must agree bit for bit.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import random
import sys

import torch
import triton

import vlserve_kernels as kernels

attention = importlib.import_module("vlserve_kernels.paged_attention")
rmsnorm = importlib.import_module("vlserve_kernels.rmsnorm")
rotary = importlib.import_module("vlserve_kernels.rotary")
activation = importlib.import_module("vlserve_kernels.activation")
store = importlib.import_module("vlserve_kernels.store_kv")

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 2, 128, 16
HIDDEN, INTERMEDIATE, MROPE_SECTION = 2048, 11008, [16, 24, 24]
MAX_REL_ERROR = 1e-2
DEVICE = "cuda"


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def make_attention_batch(query_lens, seq_lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-s // BLOCK_SIZE) for s in seq_lens]
    block_ids = list(range(sum(blocks_per_req)))
    random.Random(seed).shuffle(block_ids)   # non-contiguous blocks
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_req), dtype=torch.int32)
    for r, n in enumerate(blocks_per_req):
        block_tables[r, :n] = torch.tensor([block_ids.pop() for _ in range(n)], dtype=torch.int32)
    cache_shape = (sum(blocks_per_req), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    cpu = dict(query=torch.randn(starts[-1], NUM_Q_HEADS, HEAD_DIM, generator=gen),
               k_cache=torch.randn(cache_shape, generator=gen), v_cache=torch.randn(cache_shape, generator=gen),
               query_start_loc=torch.tensor(starts, dtype=torch.int32),
               seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=block_tables)
    batch = {k: v.to(DEVICE).to(torch.bfloat16) if v.is_floating_point() else v.to(DEVICE) for k, v in cpu.items()}
    batch.update(scale=1 / math.sqrt(HEAD_DIM), max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    return batch


def check_attention(name, query_lens, seq_lens):
    batch = make_attention_batch(query_lens, seq_lens)
    out = torch.full_like(batch["query"], float("nan"))
    run = lambda: kernels.paged_attention(**batch, out=out, query_lens_cpu=list(query_lens))
    run()
    reference = attention._reference(
        *(batch[k].float() if batch[k].is_floating_point() else batch[k]
          for k in ("query", "k_cache", "v_cache", "query_start_loc", "seq_lens", "block_tables")),
        batch["scale"], out=torch.empty_like(batch["query"], dtype=torch.float32),
        query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens))
    error = relative_error(out, reference)
    ms = triton.testing.do_bench(run)
    kv_bytes = sum(seq_lens) * NUM_KV_HEADS * HEAD_DIM * 2 * batch["k_cache"].element_size()
    io_bytes = 2 * batch["query"].numel() * batch["query"].element_size()
    return name, error, ms, (kv_bytes + io_bytes) / ms / 1e6


def check_batch_invariance():
    """One 3000-token decode row: alone, among other decodes (split-KV), in a mixed batch (looped)."""
    seq_lens = [3000, 1200, 4096, 17]
    decode = make_attention_batch([1, 1, 1, 1], seq_lens, seed=1)
    alone = {k: v for k, v in decode.items()}
    alone.update(query=decode["query"][:1], query_start_loc=decode["query_start_loc"][:2],
                 seq_lens=decode["seq_lens"][:1], block_tables=decode["block_tables"][:1], max_seq_len=3000)
    in_decode_batch = kernels.paged_attention(**decode)[0]
    by_itself = kernels.paged_attention(**alone)[0]
    mixed = dict(decode, max_query_len=2)   # same rows through the looped (mixed-batch) launch
    in_mixed_batch = kernels.paged_attention(**mixed)[0]
    same = torch.equal(in_decode_batch, by_itself) and torch.equal(in_decode_batch, in_mixed_batch)
    return "decode row alone/batched/mixed bitwise", 0.0 if same else math.inf, float("nan"), float("nan")


def check_store_kv(num_tokens=4096):
    key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    num_blocks = 2 * num_tokens // BLOCK_SIZE
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=DEVICE)[:num_tokens]
    slots[::7] = -1
    cache_shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.full(cache_shape, float("nan"), device=DEVICE, dtype=torch.bfloat16)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    run = lambda: kernels.store_kv(key, value, k_cache, v_cache, slots)
    run()
    store._reference(key, value, k_ref, v_ref, slots)
    same = torch.equal(k_cache.nan_to_num(7.0), k_ref.nan_to_num(7.0)) and torch.equal(
        v_cache.nan_to_num(7.0), v_ref.nan_to_num(7.0))
    return f"store_kv T={num_tokens}", 0.0 if same else math.inf, triton.testing.do_bench(run), float("nan")


def check_rms_norm(num_tokens=2048):
    x = torch.randn(num_tokens, HIDDEN, device=DEVICE, dtype=torch.bfloat16) * 4
    residual = torch.randn_like(x)
    weight = torch.randn(HIDDEN, device=DEVICE, dtype=torch.bfloat16) + 1
    normed, new_residual = kernels.fused_add_rms_norm(x, residual, weight, 1e-6)
    want_normed, want_residual = rmsnorm._fused_add_reference(x.float(), residual.float(), weight.float(), 1e-6)
    error = max(relative_error(normed, want_normed), relative_error(new_residual, want_residual),
                relative_error(kernels.rms_norm(x, weight, 1e-6), rmsnorm._reference(x.float(), weight.float(), 1e-6)))
    ms = triton.testing.do_bench(lambda: kernels.fused_add_rms_norm(x, residual, weight, 1e-6))
    return f"rms_norm + fused_add T={num_tokens}", error, ms, float("nan")


def check_linear_add_norm():
    """o_proj + residual add + RMSNorm (kernels/linear_norm.py) at the 3B shape: the fused small-M
    launch equals the product then the norm kernel bit for bit, rows equal alone and at M = 300."""
    x = torch.randn(300, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(HIDDEN, HIDDEN, device=DEVICE, dtype=torch.bfloat16) * HIDDEN ** -0.5
    residual = torch.randn(300, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    norm_weight = torch.randn(HIDDEN, device=DEVICE, dtype=torch.bfloat16) + 1
    fused = lambda m: kernels.batch_invariant_linear_add_rms_norm(x[:m], weight, None, residual[:m], norm_weight, 1e-6)
    want = kernels.fused_add_rms_norm(kernels.batch_invariant_linear(x, weight), residual, norm_weight, 1e-6)
    same = all(torch.equal(fused(m)[i], want[i][:m]) for m in (1, 5, 20, 64, 300) for i in (0, 1))
    ms = triton.testing.do_bench(lambda: fused(1))
    return "linear + add + rms_norm fused, bitwise", 0.0 if same else math.inf, ms, float("nan")


def check_tma_flat():
    """kernels/matmul_tma.py's flat loop against its nested loop at the 3B LM shapes (each shape's
    table tile and K split), M = 300 and 4096: bit for bit, and the time of both (printed)."""
    from vlserve_kernels import matmul, matmul_tma
    same, lines = True, []
    for n, k in ((2560, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)):
        weight = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * k ** -0.5
        x = torch.randn(4096, k, device=DEVICE, dtype=torch.bfloat16)
        num_splits, split_len = matmul.k_split(n, k)
        entry = matmul.tuned_entry(n, k) or {}
        for m, key in ((300, "mid_tma"), (4096, "large_tma")):
            tile = tuple(entry.get(key, (128, 128, 64, 8, 4)))
            runs = {flat: (lambda flat=flat: matmul_tma.launch(x[:m], weight, None, tile, num_splits, split_len,
                                                              flat=flat)) for flat in (False, True)}
            same &= torch.equal(runs[True](), runs[False]())
            ms = {flat: triton.testing.do_bench(run) for flat, run in runs.items()}
            lines.append(f"{n}x{k} M={m}: nested {ms[False] * 1e3:.0f} us, flat {ms[True] * 1e3:.0f} us")
    print("  TMA flat loop: " + "; ".join(lines))
    return "TMA linear flat loop = nested bits", 0.0 if same else math.inf, float("nan"), float("nan")


def check_rotary(mrope_section, num_tokens=2048, interleaved=False):
    query = torch.randn(num_tokens, NUM_Q_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM))
    freqs = torch.arange(32768, device=DEVICE).float()[:, None] * inv_freq[None]
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    shape = (3, num_tokens) if mrope_section else (num_tokens,)
    positions = torch.randint(0, 32768, shape, device=DEVICE)
    run = lambda: kernels.apply_rotary(query, key, positions, cache, mrope_section, interleaved)
    got = run()
    want = rotary._reference(query.float(), key.float(), positions, cache, mrope_section, interleaved)
    error = max(relative_error(g, w) for g, w in zip(got, want))
    kind = ("mrope interleaved" if interleaved else "mrope") if mrope_section else "1d"
    return f"apply_rotary {kind} T={num_tokens}", error, triton.testing.do_bench(run), float("nan")


def check_rotary_store_kv(mrope_section, num_tokens=2048, interleaved=False):
    """The fused rotary + KV write against apply_rotary then store_kv: error inf unless bit-equal."""
    query = torch.randn(num_tokens, NUM_Q_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    key, value = (torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16) for _ in "kv")
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM))
    freqs = torch.arange(32768, device=DEVICE).float()[:, None] * inv_freq[None]
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    positions = torch.randint(0, 32768, (3, num_tokens) if mrope_section else (num_tokens,), device=DEVICE)
    num_blocks = 2 * num_tokens // BLOCK_SIZE
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=DEVICE)[:num_tokens]
    slots[::7] = -1
    caches = [torch.zeros(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
              for _ in range(4)]
    run = lambda: kernels.rotary_store_kv(query, key, value, positions, cache, caches[0], caches[1], slots,
                                          mrope_section, interleaved)
    q_fused = run()
    q_ref, k_ref = kernels.apply_rotary(query, key, positions, cache, mrope_section, interleaved)
    kernels.store_kv(k_ref, value, caches[2], caches[3], slots)
    same = all(torch.equal(a, b) for a, b in ((q_fused, q_ref), (caches[0], caches[2]), (caches[1], caches[3])))
    kind = ("mrope interleaved" if interleaved else "mrope") if mrope_section else "1d"
    return (f"rotary_store_kv {kind} = unfused bits T={num_tokens}", 0.0 if same else math.inf,
            triton.testing.do_bench(run), float("nan"))


def check_rotary_store_kv_attention(mrope_section, batch_size, replays=20):
    """The decode launch doing rotary_store_kv's work itself (AttentionLaunch.fuse_rotary, this GPU's
    launch table otherwise) against rotary_store_kv then paged attention: output and both caches
    bit-equal, also on every CUDA-graph replay of the fused launch; error inf otherwise. The time is
    the fused launch's (the unfused pair's in the name)."""
    rng = random.Random(batch_size)
    seq_lens = [rng.randint(200, 2000) for _ in range(batch_size)]
    batch = make_attention_batch([1] * batch_size, seq_lens, seed=5)
    gen = torch.Generator(device=DEVICE).manual_seed(batch_size)
    key, value = (torch.randn(batch_size, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, generator=gen).to(torch.bfloat16)
                  for _ in "kv")
    last = batch["seq_lens"].long() - 1
    positions = torch.stack([last, last - 5, last - 9]) if mrope_section else last
    slots = batch["block_tables"][torch.arange(batch_size, device=DEVICE), last // BLOCK_SIZE].long() * BLOCK_SIZE \
        + last % BLOCK_SIZE
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM))
    freqs = torch.arange(4096, device=DEVICE).float()[:, None] * inv_freq[None]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(torch.bfloat16)
    args = [batch[k] for k in ("query_start_loc", "seq_lens", "block_tables", "scale")]
    k_ref, v_ref = batch["k_cache"].clone(), batch["v_cache"].clone()
    unfused = lambda: kernels.paged_attention(
        kernels.rotary_store_kv(batch["query"], key, value, positions, cos_sin, k_ref, v_ref, slots, mrope_section),
        k_ref, v_ref, *args, 1, batch["max_seq_len"])
    expected = unfused()
    k_cache, v_cache = batch["k_cache"].clone(), batch["v_cache"].clone()
    rotary_inputs = attention.DecodeRotary(key, value, positions, cos_sin, slots, mrope_section, False)
    out = torch.full_like(batch["query"], float("nan"))
    fused = lambda: attention._triton(batch["query"], k_cache, v_cache, *args, 1, batch["max_seq_len"], out,
                                      [1] * batch_size, rotary=rotary_inputs)
    fused()
    same = torch.equal(out, expected) and torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused()
    for _ in range(replays):
        out.fill_(float("nan"))
        graph.replay()
        same = same and torch.equal(out, expected) and torch.equal(k_cache, k_ref)
    kind = "mrope" if mrope_section else "1d"
    ms_unfused = triton.testing.do_bench(unfused)
    return (f"rotary+attention {kind} B={batch_size} = unfused bits ({ms_unfused * 1e3:.1f} us unfused)",
            0.0 if same else math.inf, triton.testing.do_bench(fused), float("nan"))


def check_merge_rows(batch_size, seq_len=450):
    """AttentionLaunch.merge_rows (the split launch's merge on the token's query-head rows) against
    this GPU's launch without it: the same bits, fused rotary and M-RoPE included; error inf otherwise.
    The time is merge_rows' (the tile merge's in the name)."""
    batch = make_attention_batch([1] * batch_size, [seq_len] * batch_size, seed=7)
    launch = attention.launch_for(torch.device(DEVICE))
    args = [batch[k] for k in ("query", "k_cache", "v_cache", "query_start_loc", "seq_lens", "block_tables", "scale")]

    def run(merge_rows):
        out = torch.full_like(batch["query"], float("nan"))
        chosen = dataclasses.replace(launch, merge_rows=merge_rows)
        return lambda: attention._triton(*args, 1, seq_len, out, [1] * batch_size, launch=chosen)
    tile, rows = run(False), run(True)
    same = torch.equal(tile(), rows())
    return (f"merge on token rows B={batch_size} s={seq_len} ({triton.testing.do_bench(tile) * 1e3:.1f} us tile)",
            0.0 if same else math.inf, triton.testing.do_bench(rows), float("nan"))


def check_silu_and_mul(num_tokens=2048):
    x = torch.randn(num_tokens, 2 * INTERMEDIATE, device=DEVICE, dtype=torch.bfloat16)
    run = lambda: kernels.silu_and_mul(x)
    error = relative_error(run(), activation._reference(x.float()))
    ms = triton.testing.do_bench(run)
    return f"silu_and_mul T={num_tokens}", error, ms, 3 * x.numel() // 2 * 2 / ms / 1e6


def _decode_layers(x, layers, batch, cos_sin, positions, slots, fuse_rotary=False):
    """A batch-1 decode through len(layers) Qwen2-shaped layers, every kernel of a real decode step
    (fuse_rotary: the attention launch does rotary_store_kv's work)."""
    residual = x
    hidden = kernels.rms_norm(x, layers[0]["norm"], 1e-6)
    for layer in layers:
        qkv = kernels.batch_invariant_linear(hidden, layer["qkv"])
        q, k, v = qkv.split([NUM_Q_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM], dim=-1)
        q = q.reshape(1, NUM_Q_HEADS, HEAD_DIM)
        k, v = k.reshape(1, NUM_KV_HEADS, HEAD_DIM), v.reshape(1, NUM_KV_HEADS, HEAD_DIM)
        metadata = [batch[name] for name in ("query_start_loc", "seq_lens", "block_tables", "scale")]
        if fuse_rotary:
            attn = attention._triton(q, batch["k_cache"], batch["v_cache"], *metadata, 1, batch["max_seq_len"],
                                     torch.empty_like(q), [1],
                                     rotary=attention.DecodeRotary(k, v, positions, cos_sin, slots, None, False))
        else:
            q = kernels.rotary_store_kv(q, k, v, positions, cos_sin, batch["k_cache"], batch["v_cache"], slots)
            attn = kernels.paged_attention(q, batch["k_cache"], batch["v_cache"], *metadata, 1, batch["max_seq_len"])
        out = kernels.batch_invariant_linear(attn.reshape(1, -1), layer["o"])
        hidden, residual = kernels.fused_add_rms_norm(out, residual, layer["norm"], 1e-6)
        up = kernels.silu_and_mul(kernels.batch_invariant_linear(hidden, layer["gate_up"]))
        hidden, residual = kernels.fused_add_rms_norm(kernels.batch_invariant_linear(up, layer["down"]), residual,
                                                      layer["norm"], 1e-6)
    return hidden


def check_dependent_launch(num_layers=8, replays=50, fuse_rotary=False):
    """Programmatic dependent launch (kernels/dependent_launch.py): the decode chain captured in a
    CUDA graph with PDL gives the bits of the chain without it on every replay; prints the time per
    layer of both graphs. fuse_rotary: the chain with the fused rotary + attention launch, whose bits
    must also equal the unfused chain's."""
    from vlserve_kernels import dependent_launch

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    def weight(rows, cols):
        return (torch.randn(rows, cols, device=DEVICE, generator=gen) / cols ** 0.5).to(torch.bfloat16)
    layers = [dict(qkv=weight((NUM_Q_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, HIDDEN), o=weight(HIDDEN, HIDDEN),
                   gate_up=weight(2 * INTERMEDIATE, HIDDEN), down=weight(HIDDEN, INTERMEDIATE),
                   norm=1 + 0.1 * torch.randn(HIDDEN, device=DEVICE, generator=gen).to(torch.bfloat16))
              for _ in range(num_layers)]
    batch = make_attention_batch([1], [600], seed=3)
    cos_sin = torch.randn(8192, HEAD_DIM, device=DEVICE, generator=gen)
    positions = torch.tensor([599], device=DEVICE)
    slot = batch["block_tables"][0, 599 // BLOCK_SIZE].long() * BLOCK_SIZE + 599 % BLOCK_SIZE
    x = torch.randn(1, HIDDEN, device=DEVICE, generator=gen).to(torch.bfloat16)
    results, times = {}, {}
    saved = dependent_launch._ALLOWED
    try:
        for pdl in (False, True):
            dependent_launch._ALLOWED = pdl
            run = lambda: _decode_layers(x, layers, batch, cos_sin, positions, slot.reshape(1), fuse_rotary)
            run()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()
            outs = []
            for _ in range(replays):
                graph.replay()
                outs.append(out.clone())
            results[pdl] = outs
            times[pdl] = triton.testing.do_bench(graph.replay) * 1e3 / num_layers
    finally:
        dependent_launch._ALLOWED = saved
    reference = results[False][0]
    if fuse_rotary:   # the unfused chain (eager, default PDL setting) from the same caches
        reference = _decode_layers(x, layers, batch, cos_sin, positions, slot.reshape(1))
    same = all(torch.equal(a, reference) for a in results[False] + results[True])
    label = "PDL decode chain, rotary fused into attention," if fuse_rotary else "PDL decode chain"
    print(f"  {label} in a graph: {times[False]:.2f} us per layer without PDL, {times[True]:.2f} with")
    return (f"{label} = plain bits x{replays} ({times[True]:.1f} vs {times[False]:.1f} us/layer)",
            0.0 if same else math.inf, times[True] * num_layers / 1e3, float("nan"))


def all_checks():
    rng = random.Random(0)
    yield check_store_kv()
    for batch_size, max_len in ((1, 4096), (32, 4096), (128, 1024), (256, 4096)):
        seq_lens = [rng.randint(max_len // 2, max_len) for _ in range(batch_size)]
        yield check_attention(f"decode B={batch_size} seq<={max_len}", [1] * batch_size, seq_lens)
    yield check_attention("decode B=64 seq<=500 (no split)", [1] * 64, [rng.randint(100, 500) for _ in range(64)])
    yield check_attention("prefill 512", [512], [512])
    yield check_attention("prefill chunk 2048 after 2048", [2048], [4096])
    yield check_attention("mixed: 1024 chunk + 63 decodes", [1024] + [1] * 63, [1500] + [rng.randint(16, 4096) for _ in range(63)])
    yield check_batch_invariance()
    yield check_rms_norm()
    yield check_linear_add_norm()
    yield check_tma_flat()
    yield check_rotary(None)
    yield check_rotary(MROPE_SECTION)
    yield check_rotary([24, 20, 20], interleaved=True)   # Qwen3-VL
    yield check_rotary_store_kv(None)
    yield check_rotary_store_kv(MROPE_SECTION)
    yield check_rotary_store_kv([24, 20, 20], interleaved=True)
    for mrope_section, batch_size in ((None, 1), (MROPE_SECTION, 1), (MROPE_SECTION, 64), (None, 200)):
        yield check_rotary_store_kv_attention(mrope_section, batch_size)
    for batch_size in (1, 8):
        yield check_merge_rows(batch_size)
    yield check_silu_and_mul()
    yield check_dependent_launch()
    yield check_dependent_launch(fuse_rotary=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("check_kernels needs a CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    print(f"{'case':44s} {'rel err':>10s} {'ms':>9s} {'GB/s':>8s}  status")
    failures = 0
    # `--only merge_rows`: that check alone (a short device call)
    checks = (check_merge_rows(b) for b in (1, 8)) if sys.argv[1:] == ["--only", "merge_rows"] else all_checks()
    for name, error, ms, gbps in checks:
        ok = error < MAX_REL_ERROR
        failures += not ok
        print(f"{name:44s} {error:10.2e} {ms:9.4f} {gbps:8.1f}  {'ok' if ok else 'FAIL'}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
