"""Chat about an image the server fetches itself from an http(s) URL.

The server only fetches public addresses, or hosts named in --allowed-media-domains.

    python samples/clients/chat_image_url.py --url https://example.com/cat.jpg
"""

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--model", default=None)
    parser.add_argument("--url", required=True)
    parser.add_argument("--detail", choices=["auto", "low", "high"], default=None)
    parser.add_argument("--question", default="Describe this image in one sentence.")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    image_url = {"url": args.url, **({"detail": args.detail} if args.detail else {})}
    response = client.chat.completions.create(
        model=model, max_tokens=args.max_tokens, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": image_url},
                                               {"type": "text", "text": args.question}]}])
    print(response.choices[0].message.content)


if __name__ == "__main__":
    main()
