"""Grammar backends behind one interface: `guidance` (llguidance) and `xgrammar`.

Caller: engine.structured_output.manager (compiles in its thread pool, builds one matcher per
request) and engine.frontend through `check_spec` (in the API process, before a request is
queued: a bad schema or regex is a ValueError carrying the library's message -> HTTP 400).

Both libraries write the same token bitmask: int32 words [rows, ceil(vocab / 32)], bit j of word
w set <=> token 32 * w + j is allowed.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any, Protocol

import torch

from engine.structured_output.params import GrammarSpec


class GrammarMatcher(Protocol):
    """One request's position in its grammar. Mutated only by the engine core's thread."""

    def accept_token(self, token_id: int) -> bool: ...
    def rollback(self, num_tokens: int) -> None: ...
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None: ...   # bitmask [R, W] int32, CPU
    def is_terminated(self) -> bool: ...


class GrammarBackend(Protocol):
    """Compiles specs for one tokenizer; `compile` is thread-safe and may take a while."""

    name: str

    def compile(self, spec: GrammarSpec) -> Any: ...          # -> a compiled grammar (cached by the manager)
    def new_matcher(self, compiled: Any) -> GrammarMatcher: ...
    # Fill bitmask[row] for each (matcher, row) at once (the libraries spread it over threads).
    def fill_bitmasks(self, rows: list[tuple[GrammarMatcher, int]], bitmask: torch.Tensor) -> None: ...
    # accept_token of each (matcher, token) pair -> whether each was accepted (in order).
    def accept_batch(self, pairs: list[tuple[GrammarMatcher, int]]) -> list[bool]: ...


def check_spec(backend: str, spec: GrammarSpec) -> str | None:
    """The library's message for a spec it refuses, else None. Needs no tokenizer (API process)."""
    try:
        if backend == "guidance":
            return _guidance_check(spec)
        _xgrammar_grammar(spec)
    except Exception as exc:   # noqa: BLE001 - the libraries raise their own types (GbnfToLarkError, ...)
        return _clean_message(str(exc))
    return None


def _clean_message(message: str) -> str:
    # xgrammar prefixes "[18:24:37] /project/cpp/regex_converter.cc:94: "; users need the rest.
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", message.strip())


# ---------------------------------------------------------------- llguidance


def _guidance_grammar(spec: GrammarSpec) -> str:
    from llguidance import LLMatcher, StructTag
    from llguidance.gbnf_to_lark import any_to_lark

    if spec.kind == "json":
        options: dict[str, Any] = {"whitespace_flexible": spec.any_whitespace}
        if spec.whitespace_pattern is not None:
            options["whitespace_pattern"] = spec.whitespace_pattern
        return LLMatcher.grammar_from_json_schema(spec.text, defaults=options)  # type: ignore[arg-type]
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(spec.text)))
    if spec.kind == "grammar":
        return LLMatcher.grammar_from_lark(any_to_lark(spec.text))
    tag = _structural_tag(spec.text)
    tags = [StructTag(trigger=_trigger_of(item["begin"], tag["triggers"]), begin=item["begin"],
                      grammar=item.get("schema", {}), end=item["end"]) for item in tag["structures"]]
    return LLMatcher.grammar_from_lark(StructTag.to_grammar(tags))


def _guidance_check(spec: GrammarSpec) -> str | None:
    from llguidance import LLMatcher

    return LLMatcher.validate_grammar(_guidance_grammar(spec)) or None


class GuidanceMatcher:
    def __init__(self, matcher, eos_token_id: int) -> None:
        self._matcher = matcher   # llguidance.LLMatcher
        self._eos_token_id = eos_token_id
        # llguidance's is_stopped() is already true when only EOS is left; terminated means EOS was taken.
        self._is_terminated = False

    def accept_token(self, token_id: int) -> bool:
        accepted = self._matcher.consume_token(token_id)
        self._is_terminated = accepted and token_id == self._eos_token_id
        return accepted

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)
        self._is_terminated = False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        # Not llguidance.torch's helper: importing that module runs a torch.compile decorator
        # (seconds of torch._dynamo import on the first grammar).
        words = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def is_terminated(self) -> bool:
        return self._is_terminated


PARALLEL_ACCEPT_MIN_CPUS = 8   # measured slower with 2 (busy) CPUs: bench/structured_outputs.py --host-only


class GuidanceBackend:
    name = "guidance"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import llguidance.hf

        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self._executor = llguidance.LLExecutor()   # threads: 80% of the CPUs, up to 32
        # A step's consume_token calls go to the executor's threads on a machine with cores to
        # spare; on a small one waking them costs more than the ~5 us per call they would share.
        self.parallel_accept = (os.cpu_count() or 1) >= PARALLEL_ACCEPT_MIN_CPUS

    def compile(self, spec: GrammarSpec):
        from llguidance import LLMatcher

        matcher = LLMatcher(self._tokenizer, _guidance_grammar(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher   # never advanced: each request gets a deep copy

    def new_matcher(self, compiled) -> GuidanceMatcher:
        return GuidanceMatcher(compiled.deep_copy(), self._tokenizer.eos_token)

    def fill_bitmasks(self, rows: list[tuple[GuidanceMatcher, int]], bitmask: torch.Tensor) -> None:
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.device.type == "cpu"
        self._executor.unsafe_compute_mask_ptr([(m._matcher, row) for m, row in rows], bitmask.data_ptr(),
                                               bitmask.shape[1] * 4, bitmask.shape[0])

    def accept_batch(self, pairs: list[tuple[GuidanceMatcher, int]]) -> list[bool]:
        # consume_token costs ~3-10 us in Rust (lexer + Earley step), x 256 requests a step: one
        # call spreads them over the executor's threads (without the GIL).
        if self.parallel_accept:
            accepted = self._executor.consume_token_par([(m._matcher, token_id) for m, token_id in pairs])
        else:
            accepted = [m._matcher.consume_token(token_id) for m, token_id in pairs]
        eos = self._tokenizer.eos_token
        for (matcher, token_id), ok in zip(pairs, accepted):
            matcher._is_terminated = ok and token_id == eos
        return accepted


# ---------------------------------------------------------------- xgrammar


def _xgrammar_grammar(spec: GrammarSpec):
    import xgrammar as xgr

    if spec.whitespace_pattern is not None:
        raise ValueError("whitespace_pattern is not supported by the xgrammar backend (use guidance)")
    if spec.kind == "json":
        return xgr.Grammar.from_json_schema(spec.text, any_whitespace=spec.any_whitespace)
    if spec.kind == "regex":
        return xgr.Grammar.from_regex(spec.text)
    if spec.kind == "choice":
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in json.loads(spec.text)))
    if spec.kind == "grammar":
        return xgr.Grammar.from_ebnf(spec.text)
    tag = _structural_tag(spec.text)
    items = [xgr.StructuralTagItem(begin=item["begin"], schema=json.dumps(item.get("schema", {})), end=item["end"])
             for item in tag["structures"]]
    return xgr.Grammar.from_structural_tag(items, tag["triggers"])


class XgrammarMatcher:
    def __init__(self, matcher) -> None:
        self._matcher = matcher   # xgrammar.GrammarMatcher

    def accept_token(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()


class XgrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import xgrammar as xgr

        self._compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size),
                                             cache_enabled=False)   # the manager caches
        self._lock = threading.Lock()
        self._batch = xgr.BatchGrammarMatcher()

    def compile(self, spec: GrammarSpec):
        grammar = _xgrammar_grammar(spec)
        with self._lock:   # one compiler, several pool threads
            return self._compiler.compile_grammar(grammar)

    def new_matcher(self, compiled) -> XgrammarMatcher:
        import xgrammar as xgr

        return XgrammarMatcher(xgr.GrammarMatcher(compiled))

    def fill_bitmasks(self, rows: list[tuple[XgrammarMatcher, int]], bitmask: torch.Tensor) -> None:
        self._batch.batch_fill_next_token_bitmask([m._matcher for m, _ in rows], bitmask,
                                                  indices=[row for _, row in rows])

    def accept_batch(self, pairs: list[tuple[XgrammarMatcher, int]]) -> list[bool]:
        return [matcher.accept_token(token_id) for matcher, token_id in pairs]


def _structural_tag(text: str) -> dict:
    try:
        tag = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"structural_tag is not valid JSON: {exc.msg}") from None
    if not isinstance(tag, dict) or not tag.get("structures") or not isinstance(tag.get("triggers"), list):
        raise ValueError('structural_tag needs "structures" ([{"begin", "schema", "end"}]) and "triggers" ([str])')
    return tag


def _trigger_of(begin: str, triggers: list[str]) -> str:
    for trigger in triggers:
        if begin.startswith(trigger):
            return trigger
    raise ValueError(f"structural_tag: no trigger is a prefix of begin {begin!r}")


# name -> factory(tokenizer, vocab_size) -> GrammarBackend
BACKEND_CLASSES: dict[str, Any] = {"guidance": GuidanceBackend,
                                  "xgrammar": XgrammarBackend}
