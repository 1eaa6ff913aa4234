"""engine.request_builder: builds run on worker threads, come back in input order as each and all
before it are done, a failed build raises at its place, and closing leaves no thread behind."""

import threading

import pytest

from engine.request_builder import RequestBuilder, num_build_workers


def gated_builds(count: int):
    """Builds that each wait for their own gate, so a test decides the order they finish in."""
    gates = [threading.Event() for _ in range(count)]
    finished: list[int] = []

    def build(i: int):
        assert gates[i].wait(timeout=10)
        finished.append(i)
        if i == 3:
            raise ValueError("prompt 3 is bad")
        return f"request {i}"

    return [lambda i=i: build(i) for i in range(count)], gates, finished


def build_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vlserve-build")]


def wait_until(predicate) -> None:
    event = threading.Event()
    for _ in range(1000):
        if predicate():
            return
        event.wait(0.01)
    raise AssertionError("timed out")


def test_results_come_in_input_order_whatever_order_the_threads_finish():
    builds, gates, finished = gated_builds(3)
    with RequestBuilder(builds, num_workers=3) as builder:
        gates[2].set()
        gates[1].set()
        wait_until(lambda: sorted(finished) == [1, 2])   # both done before 0
        assert builder.take_ready(wait=False) == []          # 0 still runs: nothing past it
        gates[0].set()
        assert builder.take_ready(wait=True) == [(0, "request 0"), (1, "request 1"), (2, "request 2")]
        assert builder.num_pending == 0 and builder.take_ready(wait=True) == []


def test_a_failed_build_raises_its_error_once_the_earlier_ones_are_taken():
    builds, gates, finished = gated_builds(6)
    with RequestBuilder(builds, num_workers=2) as builder:
        gates[0].set()
        assert builder.take_ready(wait=True) == [(0, "request 0")]
        for i in (3, 1, 2):   # the bad one finishes first; it raises only when its turn comes
            gates[i].set()
        wait_until(lambda: len(finished) == 4)
        with pytest.raises(ValueError, match="^prompt 3 is bad$"):
            builder.take_ready(wait=False)   # 1 and 2 were ready: dropped with the failure
        gates[4].set()
        gates[5].set()
    assert build_threads() == []


def test_closing_cancels_the_builds_not_started_and_joins_the_threads():
    builds, gates, finished = gated_builds(20)
    builder = RequestBuilder(builds, num_workers=2)
    gates[0].set()
    gates[1].set()
    wait_until(lambda: len(finished) == 2)   # the two threads now wait in builds 2 and 3
    opener = threading.Timer(0.2, lambda: [gate.set() for gate in gates[2:4]])
    opener.start()
    builder.close()   # cancels 4..19, waits for the running ones
    opener.join()
    assert {0, 1} <= set(finished) <= {0, 1, 2, 3}
    assert build_threads() == []


def test_no_workers_builds_inline_in_order():
    calls: list[int] = []
    builds = [lambda i=i: calls.append(i) or i * 10 for i in range(4)]
    with RequestBuilder(builds, num_workers=0) as builder:
        assert calls == []   # nothing runs before it is asked for
        assert builder.take_ready(wait=False) == [(0, 0), (1, 10), (2, 20), (3, 30)]
    assert calls == [0, 1, 2, 3]


def test_pool_size_leaves_a_cpu_to_the_engine_and_is_capped(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert num_build_workers(256) == 2 and num_build_workers(2) == 2 and num_build_workers(1) == 0
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert num_build_workers(256) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert num_build_workers(256) == 0   # one CPU: built inline, all before the first step
