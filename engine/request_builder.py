"""RequestBuilder: the prompts of one offline call (LLM.generate / chat / beam_search) turned into
EngineRequests on a few worker threads and handed back in input order as each becomes ready, so
the engine starts stepping on the first ones while the rest are still being built (tokenize,
resize, hash). Caller: engine.llm only.

Threads, not processes, and two of them, by measurement on the H200 host (16 cores, 256 W1
requests of a 448x448 image + 64 tokens; BENCHMARKS.md, "Building W1's requests (CPU)"): 0.31 s
serially, 0.38 s on 1 thread, 0.26 s on 2, 0.29 s on 4, 0.31 s on 8; 0.66-0.74 s on 2-8
processes, which pickle every image out and its frames back. The hash (sha256) scales with
threads, but the 602 KB of fresh pages each request keeps do not (their page faults serialise),
and every thread more takes GIL time from the engine's. What the threads buy is the overlap with
the engine: it steps on the first requests instead of waiting for all of them.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_BUILD_WORKERS = 2   # the fastest measured on the H200 host (module docstring)


def num_build_workers(num_prompts: int) -> int:
    """Worker threads for a call of num_prompts: one CPU is left to the engine's thread; 0 builds
    inline (one prompt, or one CPU)."""
    num_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if num_prompts <= 1:
        return 0
    return max(0, min(MAX_BUILD_WORKERS, num_cpus - 1, num_prompts))


class RequestBuilder(Generic[T]):
    """Runs `builds` (zero-argument callables, one per prompt) on `num_workers` threads, all
    submitted at once, or inline when num_workers is 0. Use as a context manager: leaving it
    cancels the builds not yet started and joins the threads, so none outlives the call."""

    def __init__(self, builds: Sequence[Callable[[], T]], num_workers: int):
        self._builds = list(builds)
        self._num_taken = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._futures: list[concurrent.futures.Future[T]] = []
        if num_workers > 0:
            self._executor = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="vlserve-build")
            self._futures = [self._executor.submit(build) for build in self._builds]

    def __enter__(self) -> RequestBuilder[T]:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def num_pending(self) -> int:
        """Prompts not yet handed out by take_ready."""
        return len(self._builds) - self._num_taken

    def take_ready(self, wait: bool) -> list[tuple[int, T]]:
        """(input index, result) of the next builds in input order that are done: none past one
        still running. wait: block until the next one is done (when one is pending). A failed build
        raises its own exception once every build before it has been taken; results collected in
        the same call are dropped. Inline (no workers): builds everything pending, in order."""
        taken: list[tuple[int, T]] = []
        while self._num_taken < len(self._builds):
            index = self._num_taken
            if self._executor is None:
                result = self._builds[index]()
            elif self._futures[index].done() or (wait and not taken):
                result = self._futures[index].result()   # raises the build's exception
            else:
                break
            taken.append((index, result))
            self._num_taken += 1
        return taken

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
