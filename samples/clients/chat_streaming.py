"""Stream a chat completion token by token, then print the usage chunk
(`stream_options.include_usage`).

    python samples/clients/chat_streaming.py --prompt "Write a haiku about GPUs."
"""

import argparse
import sys

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", default="Write a haiku about GPUs.")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, max_tokens=args.max_tokens, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": args.prompt}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            sys.stdout.write(chunk.choices[0].delta.content)
            sys.stdout.flush()
        if chunk.usage is not None:
            print(f"\n[usage] prompt={chunk.usage.prompt_tokens} completion={chunk.usage.completion_tokens}")


if __name__ == "__main__":
    main()
