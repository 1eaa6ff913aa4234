"""Send N identical temperature-0 requests at once and check every answer is the same
(batch composition must not change greedy results). Exits 1 if they differ.

    python samples/clients/determinism_check.py --image samples/media/out/rgb.png -n 20
"""

import argparse
import asyncio
import base64
import collections
import mimetypes
import sys

from openai import AsyncOpenAI


def build_messages(image: str | None, question: str) -> list[dict]:
    if image is None:
        return [{"role": "user", "content": question}]
    mime = mimetypes.guess_type(image)[0] or "image/png"
    with open(image, "rb") as file:
        url = f"data:{mime};base64,{base64.b64encode(file.read()).decode()}"
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


async def run(args: argparse.Namespace) -> list[str]:
    async with AsyncOpenAI(base_url=args.base_url, api_key=args.api_key) as client:
        model = args.model or (await client.models.list()).data[0].id
        messages = build_messages(args.image, args.question)
        calls = [client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                max_tokens=args.max_tokens) for _ in range(args.num_requests)]
        return [r.choices[0].message.content for r in await asyncio.gather(*calls)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--model", default=None)
    parser.add_argument("--image", default=None)
    parser.add_argument("--question", default="Describe this image.")
    parser.add_argument("-n", "--num-requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    answers = collections.Counter(asyncio.run(run(args)))
    for answer, count in answers.most_common():
        print(f"{count:3d} x {answer!r}")
    if len(answers) != 1:
        print(f"NOT deterministic: {len(answers)} different answers", file=sys.stderr)
        return 1
    print(f"deterministic: {args.num_requests} identical answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
