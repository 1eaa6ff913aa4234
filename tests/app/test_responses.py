"""app/responses.py's completions logprobs, against hand-built positions: OpenAI's shape (the chosen
token, then the most likely ones), an echoed prompt's first position (None), the -9999 clamp."""

from __future__ import annotations

from app.responses import completion_logprobs
from engine.outputs import Logprob


class Tokens:
    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def test_top_logprobs_hold_the_chosen_token_and_the_most_likely():
    position = {7: Logprob(-3.0, 4, "<7>"), 1: Logprob(-0.5, 1, "<1>"), 2: Logprob(-1.0, 2, "<2>")}
    assert completion_logprobs([7], [position], 2, Tokens()).top_logprobs == [{"<7>": -3.0, "<1>": -0.5, "<2>": -1.0}]
    assert completion_logprobs([7], [position], 0, Tokens()).top_logprobs == [{"<7>": -3.0}]
    assert completion_logprobs([1], [position], 1, Tokens()).top_logprobs == [{"<1>": -0.5}]   # chosen = most likely


def test_an_echoed_prompt_starts_with_none_and_offsets_count_characters():
    first, second = None, {5: Logprob(float("-inf"), 9, None), 6: Logprob(-0.1, 1, None)}
    result = completion_logprobs([4, 5], [first, second], 1, Tokens(), text_offset=3)
    assert result.tokens == ["<4>", "<5>"] and result.token_logprobs == [None, -9999.0]
    assert result.top_logprobs == [None, {"<5>": -9999.0, "<6>": -0.1}]
    assert result.text_offset == [3, 6]
