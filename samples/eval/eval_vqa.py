"""Evaluate a served VLM on a JSONL of {"image", "question", "answer"}: concurrent requests with a
progress bar, then accuracy, throughput and failures (see samples/eval/README.md).

    python samples/eval/eval_vqa.py --data samples/eval/orientation.jsonl --media-dir samples/media/out
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import mimetypes
import re
import sys
import tempfile
import time
from pathlib import Path

from openai import AsyncOpenAI
from tqdm import tqdm


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split()


def is_correct(prediction: str, answer: str) -> bool:
    predicted, expected = words(prediction), words(answer)
    return bool(expected) and predicted[:len(expected)] == expected


def image_data_url(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


async def ask(client: AsyncOpenAI, model: str, item: dict, media_dir: Path, max_tokens: int) -> dict:
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(media_dir / item["image"])}},
        {"type": "text", "text": item["question"]}]}]
    try:
        response = await client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                         max_tokens=max_tokens)
    except Exception as exc:  # noqa: BLE001 - a failed item is counted and reported, not fatal
        return {**item, "prediction": None, "error": f"{type(exc).__name__}: {exc}", "completion_tokens": 0}
    prediction = response.choices[0].message.content or ""
    return {**item, "prediction": prediction, "correct": is_correct(prediction, item["answer"]),
            "completion_tokens": response.usage.completion_tokens}


async def evaluate(args: argparse.Namespace, items: list[dict]) -> list[dict]:
    async with AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0,
                           timeout=args.timeout) as client:
        model = args.model or (await client.models.list()).data[0].id
        slots = asyncio.Semaphore(args.concurrency)

        async def one(item: dict) -> dict:
            async with slots:
                return await ask(client, model, item, Path(args.media_dir), args.max_tokens)

        results = []
        with tqdm(total=len(items), desc="eval", unit="req", file=sys.stderr) as bar:
            for future in asyncio.as_completed([one(item) for item in items]):
                results.append(await future)
                bar.update(1)
        return results


def report(results: list[dict], elapsed_s: float) -> dict:
    answered = [r for r in results if r.get("prediction") is not None]
    correct = sum(1 for r in answered if r["correct"])
    tokens = sum(r["completion_tokens"] for r in answered)
    return {"num_items": len(results), "num_failures": len(results) - len(answered),
            "accuracy": correct / len(results) if results else 0.0,
            "requests_per_s": len(results) / elapsed_s, "generated_tokens_per_s": tokens / elapsed_s,
            "elapsed_s": round(elapsed_s, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).with_name("orientation.jsonl")))
    parser.add_argument("--media-dir", default=str(Path(__file__).parents[1] / "media" / "out"))
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--model", default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--output", type=Path, default=Path(tempfile.gettempdir()) / "vlserve-eval" / "predictions.jsonl",
                        help="where to write one JSON line per item (prediction, correct); default: %(default)s")
    parser.add_argument("--min-accuracy", type=float, default=None, help="exit 1 below this accuracy")
    args = parser.parse_args()
    items = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    start = time.perf_counter()
    results = asyncio.run(evaluate(args, items))
    summary = report(results, time.perf_counter() - start)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(json.dumps(r) + "\n" for r in results))
    print(f"predictions: {args.output}", file=sys.stderr)
    for failure in [r for r in results if r.get("error")][:5]:
        print(f"failed: {failure['image']}: {failure['error']}", file=sys.stderr)
    print(json.dumps(summary))
    return 1 if args.min_accuracy is not None and summary["accuracy"] < args.min_accuracy else 0


if __name__ == "__main__":
    sys.exit(main())
