"""W3 vision tower: images/s and achieved TFLOP/s of the Qwen2.5-VL ViT (depth 32, hidden 1280,
16 heads, SwiGLU 3420, window 112, full attention in blocks 7/15/23/31, merger to the LM width)
on batches of 32 images at 448x448 and 1280x720 (resized to multiples of 28 as the processor
does), bf16, random weights. FLOPs are counted analytically (matmuls + attention; norms, rotary
and activations ignored), so TFLOP/s is a lower bound on the work done.

    python bench/w3_vision.py [--model qwen2_5_vl_3b | qwen3_vl_8b] [--iters 5]
Qwen3-VL's tower (patch 16, full attention in every block, GELU MLP, DeepStack mergers) is counted
the same way; its sizes round to multiples of 32.
Caller: by hand, bench/run_all.py. Same-run baseline: transformers' own vision tower
(`model.visual`) on the same pixel_values.
"""

from __future__ import annotations

import argparse

import torch

import harness

SIZES = {"448x448": (448, 448), "1280x720": (1280, 720)}
BATCH = 32


def grid_of(width: int, height: int, patch: int = 14, merge: int = 2) -> tuple[int, int, int]:
    unit = patch * merge
    return 1, max(unit, round(height / unit) * unit) // patch, max(unit, round(width / unit) * unit) // patch


def tower_flops(vc, grid: tuple[int, int, int]) -> float:
    """Forward FLOPs of one image (2 per multiply-add)."""
    t, h, w = grid
    n, d, inter = t * h * w, vc.hidden_size, vc.intermediate_size
    merge = vc.spatial_merge_size
    is_qwen3 = vc.model_type == "qwen3_vl_vision"   # full attention everywhere, 2-matrix MLP, DeepStack
    window = n if is_qwen3 else (vc.window_size // vc.patch_size // merge) ** 2 * merge ** 2  # patches per window
    patch_in = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    flops = 2 * n * patch_in * d
    for layer in range(vc.depth):
        span = n if is_qwen3 or layer in vc.fullatt_block_indexes else min(window, n)
        flops += 2 * n * d * 3 * d + 2 * n * d * d + 2 * n * d * inter * (2 if is_qwen3 else 3) + 4 * n * span * d
    merged, wide = n // merge ** 2, d * merge ** 2
    num_mergers = 1 + (len(vc.deepstack_visual_indexes) if is_qwen3 else 0)
    return flops + num_mergers * (2 * merged * wide * wide + 2 * merged * wide * vc.out_hidden_size)


def make_inputs(vc, grid, batch: int):
    patch_in = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    n = grid[0] * grid[1] * grid[2]
    pixel_values = torch.randn(batch * n, patch_in, device="cuda", dtype=torch.bfloat16)
    grid_thw = torch.tensor([grid] * batch, dtype=torch.int64, device="cuda")
    return pixel_values, grid_thw


def time_tower(forward, pixel_values, grid_thw, iters: int) -> float:
    with torch.inference_mode():
        forward(pixel_values, grid_thw)
        times = []
        for _ in range(iters):
            with harness.cuda_timer(times):
                out = forward(pixel_values, grid_thw)
    assert torch.isfinite(out if isinstance(out, torch.Tensor) else out[0]).all()
    return harness.median(times)


def our_tower(vc):
    from vision.towers import Qwen2_5_VisionTransformer, Qwen3VisionTransformer

    torch.manual_seed(0)
    tower_class = Qwen3VisionTransformer if vc.model_type == "qwen3_vl_vision" else Qwen2_5_VisionTransformer
    with torch.device("cuda"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        tower = tower_class(vc)
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for param in tower.parameters():
            param.normal_(0, 0.02)
    return tower.eval()


def measure(vc, iters: int, with_hf: bool, path: str) -> dict:
    tower = our_tower(vc)
    hf_visual = None
    if with_hf:
        hf = harness.hf_model(path)
        hf_visual = hf.visual if hasattr(hf, "visual") else hf.model.visual
    result = {}
    for name, (width, height) in SIZES.items():
        grid = grid_of(width, height, vc.patch_size, vc.spatial_merge_size)
        pixel_values, grid_thw = make_inputs(vc, grid, BATCH)
        flops = tower_flops(vc, grid) * BATCH
        seconds = time_tower(tower, pixel_values, grid_thw, iters)
        entry = {"grid": grid, "patches_per_image": grid[0] * grid[1] * grid[2], "seconds_per_batch": seconds,
                 "images_per_s": BATCH / seconds, "tflops": flops / seconds / 1e12, "gflop_per_image": flops / BATCH / 1e9}
        if hf_visual is not None:
            hf_seconds = time_tower(lambda p, g: hf_visual(p, grid_thw=g), pixel_values, grid_thw, max(2, iters // 2))
            entry.update(hf_images_per_s=BATCH / hf_seconds, hf_tflops=flops / hf_seconds / 1e12)
        result[name] = entry
        del pixel_values
        harness.free_gpu()
    return result


def report(result: dict) -> None:
    rows = []
    for name, entry in result["sizes"].items():
        rows += [(f"{name} images/s", entry["images_per_s"]), (f"{name} TFLOP/s", entry["tflops"]),
                 (f"{name} HF images/s", entry.get("hf_images_per_s", float("nan"))),
                 (f"{name} HF TFLOP/s", entry.get("hf_tflops", float("nan")))]
    rows.append(("target TFLOP/s (448x448)", 320.0))
    harness.print_table(f"W3 vision tower, batches of {BATCH}", rows)
    print("  json:", harness.write_json("w3_vision", result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_5_vl_3b")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--no-hf", action="store_true")
    args = parser.parse_args()
    from transformers import AutoConfig

    path = harness.model_dir(args.model)
    vc = AutoConfig.from_pretrained(path).vision_config
    report({"model": args.model, "sizes": measure(vc, args.iters, not args.no_hf, path)})


if __name__ == "__main__":
    main()
