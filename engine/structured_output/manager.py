"""StructuredOutputManager: the engine core's side of structured outputs. It compiles grammars
off the step loop, keeps one matcher per request, builds each step's token bitmask and advances
the matchers with the tokens the scheduler accepts.

Caller: engine.scheduler only (add_request -> grammar_status while waiting -> grammar_bitmask
each step it samples -> accept_batch with the step's one token per running request, accept_tokens
otherwise -> nothing on finish: state dies with the Request). Runs in the core's thread;
compilation runs in a thread pool.

Async scheduling builds the next step's bitmask in a fill thread instead (start_bitmask, right
after the matchers accepted the previous step's tokens; take_bitmask joins it where the sampler
needs it), so that the build overlaps the rest of the update, the output processing and the next
schedule: both libraries fill without the GIL. No matcher moves while a fill runs: accept_tokens,
accept_batch and rollback wait for it first (and mark it stale: take_bitmask then builds again).

Compiled grammars are cached by (backend, spec): a request whose schema was seen before starts
at once; a new one waits in the queue without holding up the others.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engine.scheduler_output import GrammarBitmask
from engine.structured_output.backends import BACKEND_CLASSES, GrammarBackend, GrammarMatcher
from engine.structured_output.config import StructuredOutputsConfig
from engine.structured_output.params import GrammarSpec, StructuredOutputsParams

logger = logging.getLogger(__name__)

READY, COMPILING = "ready", "compiling"
REFUSED_TOKEN_MESSAGE = ("structured outputs: the grammar refused a sampled token (nothing was allowed: min_tokens "
                         "banning the end the grammar requires, or a grammar beyond the library's limits)")


@dataclass
class _BitmaskBuild:
    """A bitmask being built in the fill thread (start_bitmask) for these requests' rows."""

    requests: list                          # engine.request.Request, in row order
    bitmask: GrammarBitmask                 # their rows, complete once `filled` is done
    filled: Future                          # -> None
    stale: bool = False                     # a matcher moved after the start: build again


@dataclass
class StructuredOutputRequest:
    """One request's grammar: its compile future until done, then its matcher."""

    backend: str
    compiled: Future
    deadline: float                         # time.monotonic() by which it must be compiled
    matcher: GrammarMatcher | None = None
    num_accepted_tokens: int = 0            # tokens the matcher consumed (for rollback)


class StructuredOutputManager:
    def __init__(self, config: StructuredOutputsConfig, load_tokenizer, vocab_size: int,
                 pin_bitmasks: bool = False) -> None:
        self.config = config
        self.vocab_size = vocab_size            # the model's logits width (may exceed the tokenizer's)
        self._load_tokenizer = load_tokenizer   # () -> HF tokenizer, called once, in a pool thread
        self._tokenizer = None
        self._backends: dict[str, GrammarBackend] = {}
        self._lock = threading.Lock()           # guards _tokenizer and _backends
        # llguidance compiles without the GIL: a burst of new schemas (W1: 256 at once) compiles on
        # half the cores, the other half left to the core's thread and the libraries' mask threads.
        self.num_compile_threads = max(2, min(8, (os.cpu_count() or 2) // 2))
        self._pool = ThreadPoolExecutor(max_workers=self.num_compile_threads, thread_name_prefix="grammar")
        self._cache: OrderedDict[tuple[str, GrammarSpec], Future] = OrderedDict()
        # Two host buffers [rows, ceil(vocab / 32)] int32, used in turn (see _next_bitmask_buffer);
        # page-locked (pin_bitmasks: a runner in this process on a GPU) so that the runner's
        # to_device copies them to the device asynchronously instead of first copying 4.9 MB
        # (256 rows x 152k vocab) into a page-locked staging buffer on the core's thread. Not for
        # TP/PP: the core process would then create a CUDA context of its own.
        self._pin_bitmasks = pin_bitmasks
        self._bitmask_buffers: list[torch.Tensor] = [self._new_bitmask_buffer(0)] * 2
        self._num_bitmasks = 0
        # One thread: one build at a time, each in the buffer its start picked.
        self._fill_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-bitmask")
        self._build: _BitmaskBuild | None = None   # started, not taken yet

    def add_request(self, req_id: str, params: StructuredOutputsParams) -> StructuredOutputRequest:
        """Start compiling (or reuse the cached compile of) the request's grammar."""
        backend = params.backend if params.backend not in (None, "auto") else self._default_backend()
        key = (backend, params.spec())
        compiled = self._cache.get(key)
        if compiled is None or (compiled.done() and compiled.exception() is not None):
            compiled = self._pool.submit(self._compile, backend, key[1])
            self._cache[key] = compiled
            while len(self._cache) > self.config.max_cached_grammars:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return StructuredOutputRequest(backend, compiled, time.monotonic() + self.config.compile_timeout_s)

    def _default_backend(self) -> str:
        return "guidance" if self.config.backend == "auto" else self.config.backend

    def _compile(self, backend_name: str, spec: GrammarSpec):
        started = time.perf_counter()
        compiled = self._backend(backend_name).compile(spec)
        logger.debug("compiled a %s grammar with %s in %.1f ms", spec.kind, backend_name,
                     1e3 * (time.perf_counter() - started))
        return compiled

    def _backend(self, name: str) -> GrammarBackend:
        with self._lock:
            if name not in self._backends:
                if self._tokenizer is None:
                    self._tokenizer = self._load_tokenizer()
                self._backends[name] = BACKEND_CLASSES[name](self._tokenizer, self.vocab_size)
            return self._backends[name]

    def grammar_status(self, state: StructuredOutputRequest) -> str:
        """READY (matcher built), COMPILING, or a user-facing error message (bad spec, timeout)."""
        if state.matcher is not None:
            return READY
        if not state.compiled.done():
            if time.monotonic() > state.deadline:
                return (f"structured outputs: the grammar did not compile within {self.config.compile_timeout_s:g} s "
                        f"(compile_timeout_s in --structured-outputs-config)")
            return COMPILING
        error = state.compiled.exception()
        if error is None:
            try:   # a library error here must fail this request, not the engine loop
                state.matcher = self._backends[state.backend].new_matcher(state.compiled.result())
            except Exception as exc:   # noqa: BLE001
                error = exc
        if error is not None:
            return f"structured outputs: invalid grammar ({state.backend}): {error}"
        return READY

    def accept_tokens(self, state: StructuredOutputRequest, token_ids: list[int]) -> bool:
        """Advance the matcher; False if the grammar refuses a token (it then stays put)."""
        self._stop_build()
        for token_id in token_ids:
            if state.matcher.is_terminated():
                return True   # EOS accepted already: later tokens (ignore_eos) are unconstrained
            if not state.matcher.accept_token(token_id):
                logger.warning("structured outputs: the grammar refused token %d", token_id)
                return False
            state.num_accepted_tokens += 1
        return True

    def accept_batch(self, states: list[StructuredOutputRequest], token_ids: list[int]) -> list[bool]:
        """accept_tokens(state, [token_id]) for each pair (one step's token per request), in one
        library call per backend: llguidance spreads it over its threads without the GIL."""
        self._stop_build()
        results = [True] * len(states)   # a terminated matcher takes anything (see accept_tokens)
        by_backend: dict[str, list[int]] = {}
        for i, state in enumerate(states):
            if not state.matcher.is_terminated():
                by_backend.setdefault(state.backend, []).append(i)
        for name, indices in by_backend.items():
            accepted = self._backends[name].accept_batch([(states[i].matcher, token_ids[i]) for i in indices])
            for i, ok in zip(indices, accepted):
                if ok:
                    states[i].num_accepted_tokens += 1
                else:
                    results[i] = False
                    logger.warning("structured outputs: the grammar refused token %d", token_ids[i])
        return results

    def rollback(self, state: StructuredOutputRequest, num_tokens: int) -> None:
        """Undo the last num_tokens accepted tokens (rejected speculative tokens)."""
        self._stop_build()
        num_tokens = min(num_tokens, state.num_accepted_tokens)
        if num_tokens:
            state.matcher.rollback(num_tokens)
            state.num_accepted_tokens -= num_tokens

    def grammar_bitmask(self, requests: list, num_scheduled_tokens: dict[str, int]) -> GrammarBitmask | None:
        """The step's scheduled requests (engine.request.Request) -> bitmask rows of those with a
        grammar that sample this step (a partial prefill chunk samples nothing). A terminated
        matcher's row allows everything (only ignore_eos runs past the end of a grammar). The
        tensor is a reused buffer: valid until the next-but-one call."""
        rows = [request for request in requests if request.structured_output is not None
                and request.num_computed_tokens + num_scheduled_tokens[request.req_id] >= request.num_tokens]
        if not rows:
            return None
        return self._fill(rows, self._next_bitmask_buffer(len(rows)))

    def start_bitmask(self, rows: list) -> None:
        """Start building the bitmask of `rows` (engine.request.Request with a grammar, that sample
        next, in row order) in the fill thread; take_bitmask returns it. The matchers must not move
        until then (those that do make the build stale). The Python part (row split, buffer turn)
        runs here; the thread only makes the libraries' calls, which drop the GIL."""
        self._stop_build()   # a build never taken (its step's sampling never came): dropped
        bitmask = self._next_bitmask_buffer(len(rows))
        by_backend = self._fill_terminated_rows(rows, bitmask)
        # Wait until the thread runs: a thread woken while this one runs Python would only get the
        # GIL at the next switch interval (5 ms), after most of the work it should overlap.
        started = threading.Event()
        filled = self._fill_thread.submit(self._fill_matchers, by_backend, bitmask, started)
        started.wait()
        self._build = _BitmaskBuild(list(rows), GrammarBitmask([request.req_id for request in rows], bitmask), filled)

    def take_bitmask(self) -> GrammarBitmask | None:
        """The bitmask start_bitmask started (waits for the fill thread), None if none was."""
        build, self._build = self._build, None
        if build is None:
            return None
        build.filled.result()
        if build.stale:   # same rows, the matchers as they stand now, in the build's buffer
            logger.debug("structured outputs: a matcher moved during a bitmask build; built again")
            return self._fill(build.requests, build.bitmask.bitmask)
        return build.bitmask

    def _stop_build(self) -> None:
        """Before a matcher moves: wait for the fill in flight; its rows are stale from now on."""
        build = self._build
        if build is not None and not build.stale:
            build.filled.exception()   # waits; an error comes out of take_bitmask
            build.stale = True

    def _fill(self, rows: list, bitmask: torch.Tensor) -> GrammarBitmask:
        """bitmask [len(rows), W] int32 <- the rows' next allowed tokens, in the core's thread."""
        self._fill_matchers(self._fill_terminated_rows(rows, bitmask), bitmask)
        return GrammarBitmask(req_ids=[request.req_id for request in rows], bitmask=bitmask)

    @staticmethod
    def _fill_terminated_rows(rows: list, bitmask: torch.Tensor) -> dict[str, list[tuple[GrammarMatcher, int]]]:
        """Rows of terminated matchers allow everything (only ignore_eos runs past the end of a
        grammar); -> the other rows' (matcher, row) by backend."""
        by_backend: dict[str, list[tuple[GrammarMatcher, int]]] = {}
        for row, request in enumerate(rows):
            state = request.structured_output
            if state.matcher.is_terminated():
                bitmask[row].fill_(-1)
            else:   # both libraries write every word of the row
                by_backend.setdefault(state.backend, []).append((state.matcher, row))
        return by_backend

    def _fill_matchers(self, by_backend: dict[str, list[tuple[GrammarMatcher, int]]], bitmask: torch.Tensor,
                       started: threading.Event | None = None) -> None:
        """The libraries' fills (in the core's thread or the fill thread): reads the matchers, moves none."""
        if started is not None:
            started.set()
        for name, matchers in by_backend.items():
            self._backends[name].fill_bitmasks(matchers, bitmask)

    def _next_bitmask_buffer(self, num_rows: int) -> torch.Tensor:
        """[num_rows, ceil(vocab / 32)] int32, uninitialised, in one of two host buffers used in
        turn: fresh memory (or a memset) for 256 rows of a 152k vocabulary costs 5-15 ms per step
        on a small host. A step's bitmask stays intact while the next one is built."""
        index = self._num_bitmasks % 2
        self._num_bitmasks += 1
        buffer = self._bitmask_buffers[index]
        if buffer.shape[0] < num_rows:
            buffer = self._bitmask_buffers[index] = self._new_bitmask_buffer(num_rows)
        return buffer[:num_rows]

    def _new_bitmask_buffer(self, num_rows: int) -> torch.Tensor:
        """[num_rows, ceil(vocab / 32)] int32. A page-locked one is safe to reuse two builds later:
        its device copy was queued before that step's sampling, whose tokens the core has read
        before the next-but-one build (engine.core: the previous step's result, then the bitmask)."""
        return torch.empty(num_rows, (self.vocab_size + 31) // 32, dtype=torch.int32, pin_memory=self._pin_bitmasks)

    def shutdown(self) -> None:
        """The fill thread is joined (a fill in flight finishes first: it writes into our buffer)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._build = None
        self._fill_thread.shutdown(wait=True)
