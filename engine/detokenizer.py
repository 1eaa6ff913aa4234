"""Turns the core's EngineOutputs (new token ids, logprobs, finish) into cumulative
RequestOutputs: incremental detokenisation, stop strings, logprob formatting, n>1 merging.

Used by engine.client (AsyncEngineClient, for the HTTP app) and engine.llm (offline API). The
core never sees text: when a stop string appears here, the caller aborts that request in the core.
"""

from __future__ import annotations

import weakref

import msgspec

from engine.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from engine.protocol import EngineOutput, EngineRequest, FinishReason, TokenLogprobs
from engine.sampling_params import SamplingParams
from vision.inputs import IMAGE, VIDEO

# Prompt tokens decoded before the first output token, so that the first token's text is
# decoded in context (leading spaces of SentencePiece / byte-level merges come out right).
_MIN_CONTEXT_TOKENS = 5
_MAX_CONTEXT_TOKENS = 24
_REPLACEMENT_CHAR = "\ufffd"

# tokenizer -> skip_special_tokens -> {token id: decode([token id])}. Decoding one id is a pure
# function of it; the prefix window of a detokenizer emitting token by token is one id, so
# this halves the Rust decodes per token. Bounded by the vocabulary.
_SINGLE_TOKEN_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class IncrementalDetokenizer:
    """The text of one completion, grown token by token without ever emitting half a character.

    Window over all ids (prompt context + output):
        [ ... | prefix_offset ......... read_offset ......... len(ids) ]
                 already-emitted text    |  tokens not yet emitted
    The new text is decode(ids[prefix:]) minus decode(ids[prefix:read]); it is held back while
    it ends in U+FFFD (a multi-byte character split over tokens).
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self._tokenizer = tokenizer
        # Fast tokenizers without clean-up: call the Rust decoder directly (2 decodes per token).
        self._backend = (getattr(tokenizer, "backend_tokenizer", None)
                         if not getattr(tokenizer, "clean_up_tokenization_spaces", True) else None)
        self._skip_special_tokens = params.skip_special_tokens
        self._raw_special = not (params.skip_special_tokens or params.spaces_between_special_tokens)
        self._special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._single_token_texts: dict[int, str] = _SINGLE_TOKEN_TEXTS.setdefault(tokenizer, {}).setdefault(
            self._skip_special_tokens, {})
        context = self._clean_context(prompt_token_ids)
        self._ids: list[int] = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._last_was_special = False
        self.text = ""

    def _clean_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The shortest prompt suffix (>= 5 tokens) that decodes to whole characters."""
        if len(prompt_token_ids) <= _MIN_CONTEXT_TOKENS:
            return list(prompt_token_ids)
        for length in range(_MIN_CONTEXT_TOKENS, min(len(prompt_token_ids), _MAX_CONTEXT_TOKENS) + 1):
            suffix = prompt_token_ids[-length:]
            if _REPLACEMENT_CHAR not in self._decode(suffix):
                return list(suffix)
        return []

    def _decode(self, token_ids: list[int]) -> str:
        if self._backend is not None:   # what the fast tokenizer's decode does without clean-up, minus its wrappers
            return self._backend.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_window(self, start: int, end: int) -> str:
        if end - start != 1:
            return self._decode(self._ids[start:end])
        token_id = self._ids[start]
        text = self._single_token_texts.get(token_id)
        if text is None:
            text = self._single_token_texts[token_id] = self._decode([token_id])
        return text

    def add_tokens(self, new_token_ids: list[int], is_final: bool = False) -> int:
        """Appends tokens; returns how many characters were added to `text`."""
        num_chars_before = len(self.text)
        for token_id in new_token_ids:
            self._ids.append(token_id)
            self.text += self._next_text(token_id, flush=False)
        if is_final and self._read_offset < len(self._ids):
            self.text += self._next_text(None, flush=True)  # a genuinely invalid byte sequence
        return len(self.text) - num_chars_before

    def _next_text(self, token_id: int | None, flush: bool) -> str:
        if self._raw_special and token_id in self._special_ids:
            if self._last_was_special and self._read_offset == len(self._ids) - 1:
                # vLLM: no space between adjacent special tokens when asked so.
                self._prefix_offset = self._read_offset = len(self._ids)
                return self._tokenizer.convert_ids_to_tokens(token_id)
            self._last_was_special = True
        elif token_id is not None:
            self._last_was_special = False
        prefix_text = self._decode_window(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._ids[self._prefix_offset:])
        if not flush and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text):]


def find_stop_string(text: str, num_new_chars: int, stop: list[str],
                     include_stop_str_in_output: bool) -> tuple[str, int] | None:
    """The earliest stop string that ends within the last `num_new_chars` characters, and the
    length the text must be cut to. None if no stop string appeared."""
    found: tuple[str, int] | None = None
    for stop_str in stop:
        search_from = max(0, len(text) - num_new_chars - len(stop_str) + 1)
        index = text.find(stop_str, search_from)
        if index != -1 and (found is None or index < found[1]):
            found = (stop_str, index)
    if found is None:
        return None
    stop_str, index = found
    return stop_str, index + len(stop_str) if include_stop_str_in_output else index


def format_logprobs(tokenizer, entry: TokenLogprobs) -> PositionLogprobs:
    """{token_id: Logprob}; the sampled token comes first (a top-k duplicate of it is merged)."""
    position: PositionLogprobs = {}
    for token_id, logprob, rank in zip(entry.token_ids, entry.logprobs, entry.ranks):
        if token_id not in position:
            position[token_id] = Logprob(logprob, rank, tokenizer.decode([token_id]))
    return position


class CompletionState:
    """One engine request = one completion: its text, tokens, logprobs and finish."""

    def __init__(self, index: int, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.index = index
        self._tokenizer = tokenizer
        self._params = params
        self._stop = list(params.stop or [])
        self._hold_back_chars = max((len(s) for s in self._stop), default=1) - 1
        self._detokenizer = (IncrementalDetokenizer(tokenizer, prompt_token_ids, params)
                             if params.detokenize else None)
        self.token_ids: list[int] = []
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None

    def process(self, output: EngineOutput) -> bool:
        """Applies one step's output. Returns True when a stop string ended the completion here
        (the core is still generating it: the caller must abort it there)."""
        if self.finish_reason is not None:
            return False
        self.token_ids.extend(output.new_token_ids)
        if output.new_logprobs:
            self._add_logprobs(output.new_logprobs)
        if output.cumulative_logprob is not None:   # beam search: the engine's float32 sum
            self.cumulative_logprob = output.cumulative_logprob
        is_final = output.finish_reason is not None
        if self._detokenizer is not None:
            num_new_chars = self._detokenizer.add_tokens(output.new_token_ids, is_final)
            self.text = self._detokenizer.text
            if self._stop and self._apply_stop_strings(num_new_chars):
                return not is_final
        if is_final:
            self._finish(output)
        return False

    def _add_logprobs(self, entries: list[TokenLogprobs]) -> None:
        for entry in entries:   # best_of asks the engine for them even when the user did not
            self.cumulative_logprob = (self.cumulative_logprob or 0.0) + entry.logprobs[0]
            if self.logprobs is not None:
                self.logprobs.append(format_logprobs(self._tokenizer, entry))

    def _apply_stop_strings(self, num_new_chars: int) -> bool:
        hit = find_stop_string(self.text, num_new_chars, self._stop, self._params.include_stop_str_in_output)
        if hit is None:
            return False
        self.stop_reason, cut_at = hit
        self.text = self.text[:cut_at]
        self.finish_reason = FinishReason.STOP.value
        return True

    def _finish(self, output: EngineOutput) -> None:
        self.finish_reason = output.finish_reason.value
        self.stop_reason = output.stop_reason
        if output.finish_reason == FinishReason.ERROR:
            self.error = output.error or "request failed in the engine"

    def completion_output(self) -> CompletionOutput:
        text = self.text
        if self.finish_reason is None and self._hold_back_chars:
            # Never show the start of what may become a stop string.
            text = text[:max(0, len(text) - self._hold_back_chars)]
        return CompletionOutput(self.index, text, list(self.token_ids), self.cumulative_logprob,
                                None if self.logprobs is None else list(self.logprobs),
                                self.finish_reason, self.stop_reason)


def child_requests(request: EngineRequest) -> list[EngineRequest]:
    """n>1: one engine request per completion ("{i}_{req_id}", vLLM's naming), seeds seed+i;
    best_of of them when best_of > n (each with its logprobs, to rank them). Beam search is one
    engine request whose k results come back as "{rank}_{req_id}"."""
    params = request.sampling_params
    num_samples = max(params.n, params.best_of or 0)
    if num_samples == 1 or params.use_beam_search:
        return [request]
    extra = {"logprobs": 0} if num_samples > params.n and params.logprobs is None else {}
    children = []
    for index in range(num_samples):
        seed = None if params.seed is None else (params.seed + index) % 2 ** 64
        child_params = msgspec.structs.replace(params, n=1, best_of=None, seed=seed, **extra)
        children.append(msgspec.structs.replace(request, req_id=f"{index}_{request.req_id}",
                                                sampling_params=child_params))
    return children


class RequestState:
    """One user request (n completions) from submission to its final RequestOutput."""

    def __init__(self, request: EngineRequest, prompt: str | None, tokenizer):
        self.request = request
        self.prompt = prompt
        self._tokenizer = tokenizer
        self.children = child_requests(request)
        params = request.sampling_params
        completion_ids = ([f"{i}_{request.req_id}" for i in range(params.n)] if params.use_beam_search
                          else [child.req_id for child in self.children])
        self._completions = {req_id: CompletionState(i, tokenizer, request.prompt_token_ids, params)
                             for i, req_id in enumerate(completion_ids)}
        self._want_prompt_logprobs = request.sampling_params.prompt_logprobs is not None
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        self.num_cached_tokens = 0

    @property
    def child_req_ids(self) -> list[str]:
        """Ids outputs may come under: each completion's, and for beam search the group's."""
        return list(self._completions) + [child.req_id for child in self.children
                                          if child.req_id not in self._completions]

    @property
    def finished(self) -> bool:
        for completion in self._completions.values():   # a loop: called per output per step
            if completion.finish_reason is None:
                return False
        return True

    @property
    def unfinished_child_ids(self) -> list[str]:
        """The engine requests still running (to abort there)."""
        if self.request.sampling_params.use_beam_search:
            return [self.request.req_id] if not self.finished else []
        return [req_id for req_id, c in self._completions.items() if c.finish_reason is None]

    def process(self, output: EngineOutput) -> bool:
        """Applies a child's output; True if a stop string hit means: abort output.req_id."""
        if output.prompt_logprobs is not None and self._want_prompt_logprobs and self.prompt_logprobs is None:
            self.prompt_logprobs = [None if entry is None else format_logprobs(self._tokenizer, entry)
                                    for entry in output.prompt_logprobs]
        self.num_cached_tokens = max(self.num_cached_tokens, output.num_cached_tokens)
        if output.req_id not in self._completions:   # beam search: the group failed as a whole
            self.finish_all(FinishReason.ERROR, output.error or "request failed in the engine")
            return False
        return self._completions[output.req_id].process(output)

    def finish_all(self, reason: FinishReason, error: str | None = None) -> None:
        """Ends every unfinished completion here (abort, engine death)."""
        for completion in self._completions.values():
            if completion.finish_reason is None:
                completion.finish_reason = reason.value
                completion.error = error

    def make_output(self) -> RequestOutput:
        completions = list(self._completions.values())
        errors = [c.error for c in completions if c.error]
        num_generated_tokens = None
        if self.finished and len(completions) > self.request.sampling_params.n:   # best_of: the top n
            num_generated_tokens = sum(len(c.token_ids) for c in completions)
            completions = _best_completions(completions, self.request.sampling_params.n)
        return RequestOutput(
            request_id=self.request.req_id, prompt=self.prompt,
            prompt_token_ids=list(self.request.prompt_token_ids),
            prompt_logprobs=self.prompt_logprobs,
            outputs=[c.completion_output() for c in completions],
            finished=self.finished, num_cached_tokens=self.num_cached_tokens,
            num_image_tokens=_num_placeholder_tokens(self.request, IMAGE),
            num_video_tokens=_num_placeholder_tokens(self.request, VIDEO),
            error=errors[0] if errors else None, num_generated_tokens=num_generated_tokens)


def _best_completions(completions: list[CompletionState], n: int) -> list[CompletionState]:
    """OpenAI's best_of: the n with the highest cumulative log-prob, renumbered 0..n-1."""
    best = sorted(completions, key=lambda c: -(c.cumulative_logprob if c.cumulative_logprob is not None
                                               else float("-inf")))[:n]
    for index, completion in enumerate(best):
        completion.index = index
    return best


def _num_placeholder_tokens(request: EngineRequest, modality: str) -> int:
    return sum(item.placeholder.length for item in request.mm_items if item.modality == modality)


class OutputProcessor:
    """The in-flight requests of one client: routes each child's EngineOutput to its RequestState.
    Single-threaded: the LLM loop, or the AsyncEngineClient's event loop, owns it."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self._parent_of: dict[str, str] = {}

    def add(self, request: EngineRequest, prompt: str | None) -> RequestState:
        if request.req_id in self.states:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        state = RequestState(request, prompt, self._tokenizer)
        self.states[request.req_id] = state
        self._parent_of.update({child_id: request.req_id for child_id in state.child_req_ids})
        return state

    def process(self, outputs: list[EngineOutput]) -> tuple[list[RequestState], list[str]]:
        """Applies a step's outputs. Returns the requests that changed (finished ones are no
        longer tracked) and the child ids a stop string ended, to abort in the core."""
        touched: dict[str, RequestState] = {}
        to_abort: list[str] = []
        for output in outputs:
            parent_id = self._parent_of.get(output.req_id)
            if parent_id is None:
                continue  # already finished here (stop string, abort)
            state = self.states[parent_id]
            if state.process(output):
                to_abort.append(output.req_id)
            touched[parent_id] = state
        for state in touched.values():
            if state.finished:
                self._forget(state)
        return list(touched.values()), to_abort

    def abort(self, req_id: str, reason: FinishReason = FinishReason.ABORT,
              error: str | None = None) -> tuple[RequestState | None, list[str]]:
        """Stops tracking a request; its unfinished completions end with `reason`. Returns the
        state and the child ids still running in the core (to abort there)."""
        state = self.states.get(req_id)
        if state is None:
            return None, []
        running = state.unfinished_child_ids
        state.finish_all(reason, error)
        self._forget(state)
        return state, running

    def _forget(self, state: RequestState) -> None:
        self.states.pop(state.request.req_id, None)
        for child_id in state.child_req_ids:
            self._parent_of.pop(child_id, None)
