"""Chat about a video (a local file sent as a data URL, or an http(s) URL the server fetches).
Frames are sampled at 2 fps (Qwen2-VL's rule) on the server.

    python samples/clients/chat_video.py --video samples/media/out/h264.mp4
"""

import argparse
import base64
import mimetypes

from openai import OpenAI


def video_url(path_or_url: str) -> str:
    if path_or_url.startswith(("http://", "https://", "data:")):
        return path_or_url
    mime = mimetypes.guess_type(path_or_url)[0] or "video/mp4"
    with open(path_or_url, "rb") as file:
        return f"data:{mime};base64,{base64.b64encode(file.read()).decode()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--model", default=None)
    parser.add_argument("--video", required=True, help="a file path or an http(s) URL")
    parser.add_argument("--question", default="What happens in this video?")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model, max_tokens=args.max_tokens, temperature=0,
        messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url(args.video)}},
                                               {"type": "text", "text": args.question}]}])
    print(response.choices[0].message.content)
    details = response.usage.prompt_tokens_details.model_dump() if response.usage.prompt_tokens_details else {}
    print(f"[video tokens] {details.get('video_tokens')}")


if __name__ == "__main__":
    main()
