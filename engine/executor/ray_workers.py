"""RayExecutor: one Ray actor per rank, placed by a placement group (`--distributed-executor-backend
ray`; the default when the world is larger than this host's GPUs). Ray spans hosts: start a
cluster with `ray start --head` on one host and `ray start --address HEAD:6379` on the others,
then start vlserve on the head (it joins the running cluster; with none it starts a local one).

Caller: engine.executor.create_executor. Actors are placed bundle by bundle (PACK: fill a host
before the next), rank 0's host and a free port there become the torch.distributed rendezvous.
Answers are collected as they finish (ray.wait), so a dead actor (RayActorError) or a failing
method is a WorkerError at once, even while the other ranks sit in a collective.
"""

from __future__ import annotations

import logging
from typing import Any

from engine.config import EngineConfig
from engine.executor.distributed import DistributedExecutor, WorkerError
from engine.executor.worker import WORKER_ENV

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 300.0


class RayExecutor(DistributedExecutor):
    def __init__(self, config: EngineConfig):
        super().__init__(config, RayWorkers(config))


class RayWorkerActor:
    """The body of each Ray actor: a Worker built on request (after the rendezvous is known)."""

    def __init__(self):
        from engine.executor.worker import set_worker_env

        set_worker_env()
        self.worker = None

    def rendezvous(self) -> tuple[str, int]:
        import ray

        from engine.executor.multiproc import free_port

        ip = ray.util.get_node_ip_address()
        return ip, free_port("0.0.0.0")

    def start(self, config: EngineConfig, rank: int, init_method: str) -> None:
        from engine.executor.worker import Worker

        # Ray narrows CUDA_VISIBLE_DEVICES to the actor's GPU, which is then device 0.
        self.worker = Worker(config, rank, init_method, local_rank=0)

    def call(self, method: str, args: tuple) -> Any:
        return getattr(self.worker, method)(*args)


class RayWorkers:
    def __init__(self, config: EngineConfig):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init()   # the running cluster (ray start / RAY_ADDRESS), else a new local one
        world_size = config.parallel_config.world_size
        use_gpu = config.device_config.device == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        self.placement_group = placement_group([dict(bundle) for _ in range(world_size)], strategy="PACK")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            ray.util.remove_placement_group(self.placement_group)
            raise WorkerError(f"the Ray cluster cannot place {world_size} workers of {bundle} within "
                              f"{PLACEMENT_TIMEOUT_S:.0f} s (cluster resources: {ray.cluster_resources()})")
        actor_class = ray.remote(RayWorkerActor)
        self.actors = [
            actor_class.options(
                num_cpus=1, num_gpus=1 if use_gpu else 0, runtime_env={"env_vars": dict(WORKER_ENV)},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group,
                                                                     placement_group_bundle_index=rank),
            ).remote()
            for rank in range(world_size)]
        self._closed = False
        try:
            host, port = self._gather([self.actors[0].rendezvous.remote()])[0]
            init_method = f"tcp://{host}:{port}"
            self._gather([actor.start.remote(config, rank, init_method) for rank, actor in enumerate(self.actors)])
        except WorkerError:
            self.shutdown(graceful=False)
            raise

    def call_all(self, method: str, *args: Any) -> list[Any]:
        import ray

        args_ref = ray.put(args)   # one copy in the object store, not one per actor; Ray resolves it
        return self._gather([actor.call.remote(method, args_ref) for actor in self.actors])

    def _gather(self, refs: list) -> list[Any]:
        """Results in order; the first failure (by completion time) raises WorkerError."""
        import ray

        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ref = done[0]
            try:
                results[index[ref]] = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                raise WorkerError(f"Ray worker rank {index[ref]} died: {_first_line(exc)}") from None
            except ray.exceptions.RayError as exc:
                logger.error("Ray worker rank %d failed: %s", index[ref], exc)
                raise WorkerError(f"Ray worker rank {index[ref]} failed: {_first_line(exc)}") from None
        return results

    def shutdown(self, graceful: bool = True) -> None:
        import ray

        del graceful   # ray.kill stops an actor at once either way
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for actor in self.actors:
            ray.kill(actor)
        ray.util.remove_placement_group(self.placement_group)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
