"""One image chat against the README's tiny server, checked against hand-computed numbers; then the
server's resident memory (the process and its children, i.e. the engine core) against the 1.5 GB goal.

Caller: .ci/first_run.sh, in the fresh venv (openai, tokenizers and the tiny model's files only).
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import openai
from tokenizers import Tokenizer

MAX_TOKENS = 16
RSS_LIMIT_BYTES = 1500 * 1000 * 1000
# rgb.png is 200x150. Qwen2.5-VL's smart_resize rounds each side to a multiple of 28 (patch 14 x merge 2):
# 150 -> 140, 200 -> 196, i.e. 10 x 14 patches, merged 2x2 into 5 x 7 = 35 placeholder tokens.
IMAGE_TOKENS = 35
QUESTION = "What is in this image?"


def expected_prompt_tokens(model_dir: Path) -> int:
    """The Qwen2-VL chat template's text for one user turn (image then text), tokenized by tokenizer.json."""
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              f"<|vision_start|>{'<|image_pad|>' * IMAGE_TOKENS}<|vision_end|>{QUESTION}<|im_end|>\n"
              "<|im_start|>assistant\n")
    return len(Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(prompt, add_special_tokens=False).ids)


def tree_rss_bytes(root_pid: int) -> int:
    """VmRSS of root_pid and every descendant (the engine core runs in a child process)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {root_pid}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    total = 0
    for pid in tree:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--model-dir", type=Path, default=Path("samples/models/out/qwen2_5_vl"))
    args = parser.parse_args()
    rss = tree_rss_bytes(args.server_pid)
    print(f"first_run: server RSS after start {rss / 1e9:.2f} GB (processes: server + engine core)")

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="EMPTY")
    model = client.models.list().data[0].id
    image = base64.b64encode(args.image.read_bytes()).decode()
    reply = client.chat.completions.create(
        model=model, max_tokens=MAX_TOKENS, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            {"type": "text", "text": QUESTION}]}])
    choice, usage = reply.choices[0], reply.usage
    print(f"first_run: answer {choice.message.content!r}, {usage}")
    assert usage.prompt_tokens == expected_prompt_tokens(args.model_dir), usage
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    assert 1 <= usage.completion_tokens <= MAX_TOKENS, usage
    assert choice.finish_reason == "stop" or usage.completion_tokens == MAX_TOKENS, (choice, usage)
    assert isinstance(choice.message.content, str) and choice.message.content, choice
    assert rss < RSS_LIMIT_BYTES, f"RSS {rss} bytes over {RSS_LIMIT_BYTES}"


if __name__ == "__main__":
    main()
