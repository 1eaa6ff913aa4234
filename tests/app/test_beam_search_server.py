"""Issue 18 on the server: a real uvicorn server with the tiny qwen2_5_vl on the CPU, driven by the
`openai` client. Oracle: the offline engine.LLM (LLM.beam_search / LLM.generate with the same
parameters), itself checked against transformers in tests/engine/test_beam_search.py.
"""

import functools

import openai
import pytest

from app.server import create_app
from engine import LLM, BeamSearchParams, SamplingParams
from tests.app.conftest import UvicornThread, server_config

ENGINE_KWARGS = dict(max_model_len=1024, device="cpu", num_gpu_blocks_override=256, max_num_seqs=32)
PROMPT = "<|im_start|>user\nWrite a short caption.<|im_end|>\n<|im_start|>assistant\n"
MESSAGES = [{"role": "user", "content": "Write a short caption."}]
WIDTH, MAX_TOKENS = 4, 10


@pytest.fixture(scope="module")
def model_path(tiny_model_dir) -> str:
    return str(tiny_model_dir("qwen2_5_vl"))


@pytest.fixture(scope="module")
def client(model_path):
    config = server_config(model=model_path, served_model_names=("tiny-vl",))
    with UvicornThread(create_app({"model": model_path, **ENGINE_KWARGS}, config)) as running:
        yield openai.OpenAI(base_url=running.base_url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def llm(model_path):
    return LLM(model=model_path, **ENGINE_KWARGS)


@functools.lru_cache(maxsize=4)
def _beam_texts(llm, prompt_ids: tuple[int, ...]) -> list[str]:
    prompt_ids = list(prompt_ids)
    [result] = llm.beam_search([{"prompt_token_ids": prompt_ids}], BeamSearchParams(beam_width=WIDTH, max_tokens=MAX_TOKENS))
    tokenizer = llm.get_tokenizer()
    return [tokenizer.decode(s.tokens[len(prompt_ids):], skip_special_tokens=True) for s in result.sequences]


def beam_texts(llm, prompt_ids) -> list[str]:
    """LLM.beam_search's sequences, best first, as the server's choices show them (generated part)."""
    return _beam_texts(llm, tuple(prompt_ids))


def test_completions_beams_equal_llm_beam_search(client, llm):
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    reply = client.completions.create(model="tiny-vl", prompt=PROMPT, n=WIDTH, max_tokens=MAX_TOKENS,
                                      extra_body={"use_beam_search": True})
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == beam_texts(llm, prompt_ids)
    assert reply.usage.prompt_tokens == len(prompt_ids)   # counted once, not per beam


def test_chat_beams_equal_llm_beam_search(client, llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    prompt_ids = llm.chat(MESSAGES, greedy, use_tqdm=False)[0].prompt_token_ids   # the rendered chat
    reply = client.chat.completions.create(model="tiny-vl", messages=MESSAGES, n=WIDTH, max_tokens=MAX_TOKENS,
                                           extra_body={"use_beam_search": True, "length_penalty": 1.0,
                                                       "early_stopping": False})
    assert [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)] == beam_texts(llm, prompt_ids)
    assert reply.usage.prompt_tokens == len(prompt_ids)


def test_streamed_beams_arrive_when_they_finish(client, llm):
    stream = client.completions.create(model="tiny-vl", prompt=PROMPT, n=WIDTH, max_tokens=MAX_TOKENS, stream=True,
                                       extra_body={"use_beam_search": True})
    texts = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert [texts[i] for i in range(WIDTH)] == beam_texts(llm, llm.get_tokenizer().encode(PROMPT))


def test_best_of_returns_the_best_samples_and_counts_them_all(client, llm):
    params = dict(n=2, max_tokens=6, temperature=1.0, seed=5)
    reply = client.completions.create(model="tiny-vl", prompt=PROMPT, best_of=4, **params)
    [offline] = llm.generate(PROMPT, SamplingParams(best_of=4, **params), use_tqdm=False)
    [all_four] = llm.generate(PROMPT, SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=5), use_tqdm=False)
    assert [c.text for c in reply.choices] == [c.text for c in offline.outputs]
    assert reply.usage.completion_tokens == sum(len(c.token_ids) for c in all_four.outputs)


@pytest.mark.parametrize("body,expected", [
    (dict(n=0, extra_body={"use_beam_search": True}), "field: n"),
    (dict(n=9, extra_body={"use_beam_search": True}), "n (the beam width with use_beam_search) must be at most 8"),
    (dict(n=3, best_of=2), "best_of must be at least n (3)"),
    (dict(n=1, best_of=2, stream=True), "best_of is not supported with stream"),
    (dict(n=2, best_of=17), "best_of must be at most 16"),
    (dict(n=2, extra_body={"use_beam_search": True, "temperature": 0.8}), "temperature must be 0 with use_beam_search"),
])
def test_bad_beam_and_best_of_requests_are_400(client, body, expected):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny-vl", prompt=PROMPT, max_tokens=4, **body)
    assert expected in error.value.body["message"]


def test_beam_width_cap_is_checked_before_media_is_fetched(client):
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://10.255.255.1/never-fetched.png"}},
        {"type": "text", "text": "Describe."}]}]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny-vl", messages=messages, n=9, max_tokens=4,
                                       extra_body={"use_beam_search": True})
    assert "beam width" in str(error.value)
