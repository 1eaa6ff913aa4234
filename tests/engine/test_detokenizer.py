"""engine.detokenizer against tokenizer.decode of the whole sequence (the oracle) and
hand-computed stop-string / logprob results. The tokenizer is a byte-level BPE trained here on
ASCII only, so every CJK character and emoji is split over several byte tokens."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.detokenizer import (CompletionState, IncrementalDetokenizer, RequestState,
                                child_requests, find_stop_string, format_logprobs)
from engine.protocol import EngineOutput, EngineRequest, FinishReason, TokenLogprobs
from engine.sampling_params import SamplingParams

TEXT = "Answer: 你好，世界 🙂🎉 naïve café — done. 日本語テキスト👍🏽 end"


@pytest.fixture(scope="module")
def tokenizer():
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    backend.train_from_iterator(["Answer: the quick brown fox jumps over the lazy dog. done end STOP"] * 20,
                                trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>", "<|endoftext|>"])


def _feed(state, token_ids, finish_at_end=FinishReason.LENGTH):
    """One EngineOutput per token; returns the visible text after each and the abort flags."""
    texts, aborts = [], []
    for i, token_id in enumerate(token_ids):
        last = i == len(token_ids) - 1
        aborts.append(state.process(EngineOutput("r", [token_id], finish_reason=finish_at_end if last else None)))
        texts.append(state.completion_output().text)
        if state.finish_reason is not None:
            break
    return texts, aborts


def test_incremental_text_equals_full_decode_and_never_splits_a_character(tokenizer):
    prompt_ids = tokenizer.encode("<|im_start|>user 日本 question<|im_end|>")
    output_ids = tokenizer.encode(TEXT)
    assert len(output_ids) > len(TEXT) // 2 + 10  # multi-byte characters really are split
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams())
    for token_id in output_ids:
        before = detok.text
        detok.add_tokens([token_id])
        assert "\ufffd" not in detok.text[len(before):]
    assert detok.text == tokenizer.decode(output_ids, skip_special_tokens=True) == TEXT


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept_like_decode(tokenizer, skip):
    output_ids = tokenizer.encode("hi 你") + [tokenizer.convert_tokens_to_ids("<|im_start|>")] + tokenizer.encode("🙂 x")
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("q"), SamplingParams(skip_special_tokens=skip))
    detok.add_tokens(output_ids[:3])
    detok.add_tokens(output_ids[3:], is_final=True)
    assert detok.text == tokenizer.decode(output_ids, skip_special_tokens=skip)
    assert ("<|im_start|>" in detok.text) is (not skip)


def test_invalid_byte_sequence_is_flushed_at_the_end(tokenizer):
    lone_byte = tokenizer.encode("你")[:1]  # the first byte of a 3-byte character, alone
    output_ids = tokenizer.encode("ok ") + lone_byte
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    detok.add_tokens(output_ids)
    assert detok.text == "ok "
    detok.add_tokens([], is_final=True)
    assert detok.text == tokenizer.decode(output_ids)


def test_find_stop_string_hand_values():
    assert find_stop_string("abc STOP x", 2, ["STOP"], False) is None  # ended before the new chars
    assert find_stop_string("abc STOP", 2, ["STOP"], False) == ("STOP", 4)
    assert find_stop_string("abc STOP", 2, ["STOP"], True) == ("STOP", 8)
    assert find_stop_string("a<b>c", 3, ["c", "<b>"], False) == ("<b>", 1)  # earliest wins


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens_truncates_and_never_leaks(tokenizer, include):
    body = "The answer 你好 is 42. "
    output_ids = tokenizer.encode(body + "STOP and more text")
    params = SamplingParams(stop=["STOP", "never-seen"], include_stop_str_in_output=include)
    state = CompletionState(0, tokenizer, tokenizer.encode("q"), params)
    texts, aborts = _feed(state, output_ids)
    expected = body + "STOP" if include else body
    assert texts[-1] == expected and state.finish_reason == "stop" and state.stop_reason == "STOP"
    assert aborts[-1] is True and not any(aborts[:-1])
    for earlier, later in zip(texts, texts[1:]):
        assert later.startswith(earlier)
    assert all("S" not in t[len(body):] for t in texts[:-1])  # no partial stop string shown
    assert state.token_ids == output_ids[:len(texts)]


def test_length_finish_shows_the_held_back_tail(tokenizer):
    output_ids = tokenizer.encode("short 🙂 text")
    state = CompletionState(0, tokenizer, [], SamplingParams(stop=["a-long-stop-string"]))
    texts, _ = _feed(state, output_ids, finish_at_end=FinishReason.LENGTH)
    assert texts[-1] == "short 🙂 text" and state.finish_reason == "length"
    assert len(texts[-2]) <= len(texts[-1]) - 1 - len("text")  # held back while running


def test_format_logprobs_merges_the_sampled_token_and_decodes(tokenizer):
    a, b = tokenizer.encode(" world")[0], tokenizer.encode("x")[0]
    entry = TokenLogprobs(token_ids=[a, a, b], logprobs=[-0.5, -0.5, -1.5], ranks=[1, 1, 2])
    formatted = format_logprobs(tokenizer, entry)
    assert list(formatted) == [a, b]
    assert formatted[a].logprob == -0.5 and formatted[a].rank == 1
    assert formatted[a].decoded_token == tokenizer.decode([a]) and formatted[b].decoded_token == "x"


def test_completion_logprobs_and_cumulative(tokenizer):
    state = CompletionState(0, tokenizer, [], SamplingParams(logprobs=1))
    entries = [TokenLogprobs([5, 6], [-1.0, -0.25], [3, 1]), TokenLogprobs([7, 7], [-0.5, -0.5], [1, 1])]
    state.process(EngineOutput("r", [5, 7], new_logprobs=entries, finish_reason=FinishReason.STOP, stop_reason=7))
    out = state.completion_output()
    assert out.cumulative_logprob == pytest.approx(-1.5)
    assert [list(p) for p in out.logprobs] == [[5, 6], [7]]
    assert out.finish_reason == "stop" and out.stop_reason == 7


def test_children_and_merged_output(tokenizer):
    request = EngineRequest("req", [1, 2, 3], SamplingParams(n=3, seed=7, max_tokens=4))
    children = child_requests(request)
    assert [c.req_id for c in children] == ["0_req", "1_req", "2_req"]
    assert [c.sampling_params.seed for c in children] == [7, 8, 9]
    assert all(c.sampling_params.n == 1 for c in children)
    state = RequestState(request, "p", tokenizer)
    ids = tokenizer.encode("ab")
    state.process(EngineOutput("1_req", ids, finish_reason=FinishReason.LENGTH))
    state.process(EngineOutput("0_req", ids[:1]))
    partial = state.make_output()
    assert not partial.finished and partial.outputs[1].text == "ab" and partial.outputs[0].finish_reason is None
    state.process(EngineOutput("0_req", ids[1:], finish_reason=FinishReason.STOP))
    state.process(EngineOutput("2_req", [], finish_reason=FinishReason.ERROR, error="bad image"))
    final = state.make_output()
    assert final.finished and final.error == "bad image"
    assert [o.index for o in final.outputs] == [0, 1, 2] and final.outputs[0].text == "ab"
