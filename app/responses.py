"""Finished RequestOutputs -> OpenAI response bodies (non-streaming), plus the pieces the
streaming path shares: usage, and logprobs in the chat and the completions shapes.

Caller: app.routes.chat / app.routes.completions (collect mode) and app.streaming (chunks).
A RequestOutput's `logprobs[i]` maps token id -> Logprob for output position i; the sampled token
is `token_ids[i]`, the rest are the top-k by rank.
"""

from __future__ import annotations

from typing import Any

from app.protocol import (AssistantMessage, ChatCompletionChoice, ChatCompletionResponse, ChoiceLogprobs,
                          CompletionChoice, CompletionLogprobs, CompletionResponse, PromptLogprob, PromptTokensDetails,
                          TokenLogprob, TopLogprob, Usage)
from app.tool_parsers import hermes


def usage_of(outputs: list[Any]) -> Usage:
    """Usage over one or more RequestOutputs (several prompts in one /v1/completions call)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(sum(len(c.token_ids) for c in o.outputs) if o.num_generated_tokens is None
                     else o.num_generated_tokens for o in outputs)   # best_of: every sample counts
    details = PromptTokensDetails(cached_tokens=sum(o.num_cached_tokens for o in outputs),
                                  image_tokens=sum(o.num_image_tokens for o in outputs),
                                  video_tokens=sum(o.num_video_tokens for o in outputs))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=details)


def _token_text(token_id: int, logprob: Any, tokenizer: Any) -> str:
    if logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])


def chat_logprobs(token_ids: list[int], logprobs: list[dict], num_top: int, tokenizer: Any) -> ChoiceLogprobs:
    content = []
    for token_id, position in zip(token_ids, logprobs):
        sampled = position[token_id]
        text = _token_text(token_id, sampled, tokenizer)
        top = [TopLogprob(token=(t := _token_text(tid, lp, tokenizer)), logprob=lp.logprob,
                          bytes=list(t.encode("utf-8")))
               for tid, lp in sorted(position.items(), key=lambda item: -item[1].logprob)[:num_top]]
        content.append(TokenLogprob(token=text, logprob=sampled.logprob, bytes=list(text.encode("utf-8")),
                                    top_logprobs=top))
    return ChoiceLogprobs(content=content)


def completion_logprobs(token_ids: list[int], logprobs: list[dict | None], num_top: int, tokenizer: Any,
                        text_offset: int = 0) -> CompletionLogprobs:
    """logprobs[i]: token id -> Logprob at position i, or None (an echoed prompt's first token: no
    log-prob, as vLLM reports it). Prompt log-probs are clamped at -9999 as vLLM's are (no -inf in JSON)."""
    result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token_id, position in zip(token_ids, logprobs):
        if position is None:
            text = tokenizer.decode([token_id])
            result.tokens.append(text)
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            sampled = position[token_id]
            text = _token_text(token_id, sampled, tokenizer)
            result.tokens.append(text)
            result.token_logprobs.append(max(sampled.logprob, _LOWEST_LOGPROB))
            # OpenAI's (and vLLM's) completions shape: the chosen token, then the num_top most likely
            # (up to num_top + 1 entries; logprobs 0 gives the chosen token's alone)
            ranked = sorted(position.items(), key=lambda item: -item[1].logprob)[:num_top]
            shown = [(token_id, sampled)] + [(tid, lp) for tid, lp in ranked if tid != token_id]
            result.top_logprobs.append({_token_text(tid, lp, tokenizer): max(lp.logprob, _LOWEST_LOGPROB)
                                        for tid, lp in shown})
        result.text_offset.append(text_offset)
        text_offset += len(text)
    return result


_LOWEST_LOGPROB = -9999.0   # vLLM's clamp of reported log-probs


def echoed_prompt(output: Any, num_top: int | None) -> tuple[list[int], list[dict | None]] | None:
    """The prompt's (token ids, log-prob positions) to put before an echoed completion's own in its
    logprobs, or None when logprobs were not asked or the prompt's have not arrived."""
    if num_top is None or output.prompt_logprobs is None:
        return None
    return list(output.prompt_token_ids), list(output.prompt_logprobs)


def prompt_logprobs_of(output: Any) -> list[dict[int, PromptLogprob] | None] | None:
    """RequestOutput.prompt_logprobs in vLLM's response shape (CompletionChoice.prompt_logprobs)."""
    if output.prompt_logprobs is None:
        return None
    return [None if position is None else
            {token_id: PromptLogprob(logprob=max(lp.logprob, _LOWEST_LOGPROB), rank=lp.rank,
                                     decoded_token=lp.decoded_token) for token_id, lp in position.items()}
            for position in output.prompt_logprobs]


def chat_choice(completion: Any, *, use_tools: bool, num_top: int | None, tokenizer: Any) -> ChatCompletionChoice:
    content, tool_calls = (hermes.parse(completion.text) if use_tools else (completion.text, []))
    finish = "tool_calls" if tool_calls else completion.finish_reason
    logprobs = None
    if num_top is not None and completion.logprobs is not None:
        logprobs = chat_logprobs(completion.token_ids, completion.logprobs, num_top, tokenizer)
    message = AssistantMessage(content=content, tool_calls=tool_calls)
    return ChatCompletionChoice(index=completion.index, message=message,
                                finish_reason=finish, logprobs=logprobs, stop_reason=completion.stop_reason)


def chat_response(request_id: str, model: str, output: Any, *, use_tools: bool, num_top: int | None,
                  tokenizer: Any, role: str = "assistant", echo: str = "",
                  return_token_ids: bool = False) -> ChatCompletionResponse:
    """echo: text put before every choice's content (vLLM's chat echo of a message with the reply's role).
    return_token_ids: the prompt's token ids and each choice's (vLLM's fields)."""
    completions = sorted(output.outputs, key=lambda c: c.index)
    choices = [chat_choice(c, use_tools=use_tools, num_top=num_top, tokenizer=tokenizer) for c in completions]
    for choice, completion in zip(choices, completions):
        choice.message.role = role
        if echo:
            choice.message.content = echo + (choice.message.content or "")
        if return_token_ids:
            choice.token_ids = list(completion.token_ids)
    return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of([output]),
                                  prompt_logprobs=prompt_logprobs_of(output),
                                  prompt_token_ids=list(output.prompt_token_ids) if return_token_ids else None)


def completion_response(request_id: str, model: str, created: int, outputs: list[Any], *, n: int,
                        echo_texts: list[str] | None, num_top: int | None, tokenizer: Any,
                        scored_only: bool = False, return_token_ids: bool = False) -> CompletionResponse:
    """scored_only (echo with max_tokens 0): each choice is its echoed prompt alone; the one token
    sampled to score it is left out of the text and the logprobs (usage counts it, as vLLM's does).
    return_token_ids: each choice carries its prompt's token ids and its own (vLLM's fields)."""
    choices = []
    for prompt_index, output in enumerate(outputs):
        echo = echo_texts[prompt_index] if echo_texts else ""
        prompt_part = echoed_prompt(output, num_top) if echo_texts else None
        prompt_ids = list(output.prompt_token_ids) if return_token_ids else None
        prompt_logprobs = prompt_logprobs_of(output)
        for completion in sorted(output.outputs, key=lambda c: c.index):
            token_ids, positions = prompt_part or ([], [])
            if not scored_only and completion.logprobs is not None:
                token_ids, positions = token_ids + completion.token_ids, positions + completion.logprobs
            logprobs = None
            if num_top is not None and (completion.logprobs is not None or prompt_part is not None):
                logprobs = completion_logprobs(token_ids, positions, num_top, tokenizer,
                                               text_offset=0 if prompt_part else len(echo))
            choices.append(CompletionChoice(index=prompt_index * n + completion.index,
                                            text=echo + ("" if scored_only else completion.text),
                                            finish_reason=completion.finish_reason, logprobs=logprobs,
                                            stop_reason=completion.stop_reason,
                                            prompt_logprobs=prompt_logprobs, prompt_token_ids=prompt_ids,
                                            token_ids=(([] if scored_only else list(completion.token_ids))
                                                       if return_token_ids else None)))
    return CompletionResponse(id=request_id, model=model, created=created, choices=choices, usage=usage_of(outputs))
