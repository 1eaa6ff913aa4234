"""MultiprocExecutor: one spawned process per rank on this host (`--distributed-executor-backend
mp`, the default for TP/PP on one host).

Caller: engine.executor.create_executor. The engine core talks to each worker over its own
duplex Pipe: a request is ("method", args) pickled once and sent to every rank; each answers
("ok", result) or ("error", traceback). While collecting answers the core also waits on every
process sentinel, so a worker that dies (killed, out of memory, segfault) is reported at once as
a WorkerError naming its rank and exit code -- never a hang on the survivors.

    core ──(method, args)──▶ pipe 0 ──▶ worker rank 0 ┐
         ──(method, args)──▶ pipe 1 ──▶ worker rank 1 ┼─ torch.distributed (gloo / NCCL)
    core ◀──("ok", result)── pipes  ◀── every rank    ┘

Workers exit when their pipe closes (the core went away) or on ("shutdown", ()).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import socket
import traceback
from multiprocessing.connection import wait
from typing import Any

from engine.config import EngineConfig
from engine.process_signals import ignore_group_stop_signals
from engine.executor.distributed import DistributedExecutor, WorkerError

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0


class MultiprocExecutor(DistributedExecutor):
    def __init__(self, config: EngineConfig):
        super().__init__(config, MultiprocWorkers(config))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _children_allowed():
    """The engine core itself may run in a daemonic process (engine.core_host.ProcessCore), which
    multiprocessing forbids to start children. Our workers are daemonic and also leave when their
    pipe closes, so lifting the flag while they start orphans nothing."""
    process = multiprocessing.current_process()
    was_daemon = process.daemon
    if was_daemon:
        process.daemon = False
    try:
        yield
    finally:
        if was_daemon:
            process.daemon = True


class MultiprocWorkers:
    def __init__(self, config: EngineConfig):
        context = multiprocessing.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.processes, self.pipes = [], []
        self._closed = False
        with _children_allowed():
            for rank in range(config.parallel_config.world_size):
                parent_end, child_end = context.Pipe(duplex=True)
                process = context.Process(target=worker_process_main, name=f"vlserve-worker-{rank}", daemon=True,
                                          args=(config, rank, init_method, child_end))
                process.start()
                child_end.close()
                self.processes.append(process)
                self.pipes.append(parent_end)
        try:
            self._collect(READY_TIMEOUT_S)   # each rank answers once its model is loaded
        except WorkerError:
            self.shutdown(graceful=False)
            raise

    def call_all(self, method: str, *args: Any) -> list[Any]:
        data = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        for rank, pipe in enumerate(self.pipes):
            try:
                pipe.send_bytes(data)
            except (BrokenPipeError, OSError):
                raise WorkerError(self._death_message(rank)) from None
        return self._collect(None)

    def _collect(self, timeout_s: float | None) -> list[Any]:
        results: list[Any] = [None] * len(self.pipes)
        pending = set(range(len(self.pipes)))
        while pending:
            ready = wait([self.pipes[r] for r in pending] + [self.processes[r].sentinel for r in pending], timeout_s)
            if not ready:
                raise WorkerError(f"workers {sorted(pending)} did not answer within {timeout_s:.0f} s")
            for rank in sorted(pending):
                pipe = self.pipes[rank]
                if pipe in ready or pipe.poll(0):   # an answer is read before a sentinel counts
                    results[rank] = self._answer(rank)
                    pending.discard(rank)
                elif self.processes[rank].sentinel in ready:
                    raise WorkerError(self._death_message(rank))
        return results

    def _answer(self, rank: int) -> Any:
        try:
            status, payload = self.pipes[rank].recv()
        except (EOFError, OSError):
            raise WorkerError(self._death_message(rank)) from None
        if status == "error":
            logger.error("worker rank %d failed:\n%s", rank, payload)
            failure = f"worker rank {rank} failed: {payload.strip().splitlines()[-1]}"
            dead = self._dead_peer(rank)   # a killed peer breaks the collectives of the others
            raise WorkerError(failure if dead is None else f"{self._death_message(dead)}; then {failure}")
        return payload

    def _dead_peer(self, rank: int) -> int | None:
        """Another rank whose process has exited (waiting briefly for it to be reaped), or None."""
        for other, process in enumerate(self.processes):
            if other != rank:
                process.join(0.5)
                if process.exitcode is not None:
                    return other
        return None

    def _death_message(self, rank: int) -> str:
        process = self.processes[rank]
        process.join(1.0)
        return f"worker rank {rank} (pid {process.pid}) died (exit code {process.exitcode})"

    def shutdown(self, graceful: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        data = pickle.dumps(("shutdown", ()))
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send_bytes(data)
        for process in self.processes:
            process.join(5.0 if graceful else 0.0)
            if process.is_alive():   # e.g. blocked in a collective with a dead peer
                process.kill()
                process.join(5.0)
        for pipe in self.pipes:
            pipe.close()


def worker_process_main(config: EngineConfig, rank: int, init_method: str, pipe) -> None:
    """Entry point of a worker process (spawned); it leaves on "shutdown" or when the core's pipe
    closes, never on the process group's SIGTERM/SIGINT (engine.process_signals)."""
    from engine.executor.worker import Worker, set_worker_env

    ignore_group_stop_signals()
    set_worker_env()
    local_rank = rank   # one host: rank i uses GPU i
    try:
        worker = Worker(config, rank, init_method, local_rank)
    except BaseException:  # noqa: BLE001 - tell the core why, then exit
        pipe.send(("error", traceback.format_exc()))
        return
    pipe.send(("ok", None))
    while True:
        try:
            method, args = pickle.loads(pipe.recv_bytes())
        except (EOFError, OSError):
            return   # the engine core is gone
        if method == "shutdown":
            worker.close()
            return
        try:
            pipe.send(("ok", getattr(worker, method)(*args)))
        except BaseException:  # noqa: BLE001 - reported to the core, which tears the world down
            pipe.send(("error", traceback.format_exc()))
