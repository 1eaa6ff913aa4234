"""GPU check of the vision share of the memory plan (issue 16): the engine on the Qwen2.5-VL-3B shape
with dummy weights at --gpu-memory-utilization 0.95, then a batch of requests each carrying the
largest image the limits allow (as many as one step's tower batch holds, plus one), all at once.
Prints the encoder plan, the start-up memory plan (the engine logs it, naming the tower's share) and
the peak memory; exits 1 on an out-of-memory error or a failed request. Runs in well under 3 minutes.

    python bench/check_vision_memory.py [--gpu-memory-utilization 0.95] [--max-model-len 20000]
Caller: by hand on the GPU machine (the lead); the result goes to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "samples" / "models"))

PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
          "<|im_start|>assistant\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.95)
    parser.add_argument("--max-model-len", type=int, default=20000)
    parser.add_argument("--limit-mm-per-prompt", default="image=5,video=0")
    parser.add_argument("--shape", default="qwen2_5_vl_3b")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch
    from PIL import Image

    from app.cli import parse_limit_mm_per_prompt
    from engine import LLM, SamplingParams
    from engine.runner.memory_plan import encoder_plan, largest_image_size
    from real_shape import write_real_shape_dir
    from vision.processors import get_processor

    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(write_real_shape_dir(args.shape, Path(tmp) / args.shape))
        llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", device="cuda",
                  gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                  limit_mm_per_prompt=parse_limit_mm_per_prompt(args.limit_mm_per_prompt))
        plan = encoder_plan(llm.config)
        print(f"encoder plan: {plan}")
        processor = get_processor(model_dir, llm.config.model_config.hf_config)
        height, width = largest_image_size(processor, plan)
        image = Image.new("RGB", (width, height), (120, 80, 200))
        num_requests = plan.num_items_per_step + 1
        print(f"sending {num_requests} requests, each with a {width}x{height} image "
              f"({processor.num_tokens_for_size('image', height, width)} rows)")
        torch.cuda.reset_peak_memory_stats()
        try:
            outputs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": image}}] * num_requests,
                                   SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        except (torch.OutOfMemoryError, ValueError) as exc:
            print(f"FAILED: {exc}")
            return 1
        free, total = torch.cuda.mem_get_info()
        print(f"ok: {len(outputs)} requests, {sum(len(o.outputs[0].token_ids) for o in outputs)} tokens; "
              f"peak allocated during the batch {torch.cuda.max_memory_allocated() / (1 << 30):.2f} GiB, "
              f"free now {free / (1 << 30):.2f} of {total / (1 << 30):.2f} GiB; {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
