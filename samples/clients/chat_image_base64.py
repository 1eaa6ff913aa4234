"""Chat about a local image sent inline as a base64 data URL (vLLM's "image input" example).

    python samples/clients/chat_image_base64.py --image samples/media/out/rgb.png
"""

import argparse
import base64
import mimetypes

from openai import OpenAI


def data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    with open(path, "rb") as file:
        return f"data:{mime};base64,{base64.b64encode(file.read()).decode()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", default="What is in this image?")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model, max_tokens=args.max_tokens, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(args.image)}},
            {"type": "text", "text": args.question}]}])
    print(response.choices[0].message.content)
    print(f"[usage] {response.usage.model_dump()}")


if __name__ == "__main__":
    main()
