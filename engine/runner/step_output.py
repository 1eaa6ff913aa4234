"""StepOutput: a launched step's output on its way to the host. Caller: ModelRunner.sample_tokens
(builds it right after queueing the sampler) and engine.core (result(), once the next step is
queued behind it).

The sampled tokens (and logprobs) are copied into pinned host memory by copies queued on the
step's stream, followed by an event. result() waits for that event only, not for whatever was
queued after it (the next step), then turns the copies into a ModelRunnerOutput and records the
tokens in the InputBatch (which until then reads them from the device).
"""

from __future__ import annotations

import torch

from engine.protocol import TokenLogprobs
from engine.runner_output import ModelRunnerOutput
from engine.sampler import SamplerOutput


def _to_host(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A copy on the host queued on the current stream (pinned, so the copy is asynchronous)."""
    if tensor is None or not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class StepOutput:
    def __init__(self, input_batch, batch, sampler_output: SamplerOutput | None,
                 prompt_logprobs: dict[str, list[TokenLogprobs | None]], failed: dict[str, str]):
        self._input_batch = input_batch
        self._req_ids = batch.req_ids if batch is not None else []
        self._sampling_req_ids = batch.sampling_req_ids if batch is not None else []
        # Read now: a request aborted before result() has left the InputBatch by then.
        self._logprobs_wanted = ({r: input_batch.requests[r].sampling_params.logprobs for r in self._sampling_req_ids}
                                 if sampler_output is not None and sampler_output.logprobs is not None else {})
        self._prompt_logprobs = prompt_logprobs
        self._failed = failed
        self._ready: ModelRunnerOutput | None = None
        self._event: torch.cuda.Event | None = None
        self._host: tuple = ()
        if sampler_output is not None:
            out = sampler_output
            self._host = (_to_host(out.sampled_token_ids), _to_host(out.logprob_token_ids),
                          _to_host(out.logprobs), _to_host(out.logprob_ranks))
            if out.sampled_token_ids.is_cuda:
                self._event = torch.cuda.Event()
                self._event.record()

    @classmethod
    def ready(cls, output: ModelRunnerOutput) -> "StepOutput":
        step = cls.__new__(cls)
        step._ready = output
        return step

    def result(self) -> ModelRunnerOutput:
        """Wait for this step's copies (not for later steps), record its tokens, -> the output."""
        if self._ready is not None:
            return self._ready
        if self._event is not None:
            self._event.synchronize()
        sampled, logprobs = self._sampled_and_logprobs()
        sampled_token_ids = [[sampled[r]] if r in sampled else [] for r in self._req_ids]
        self._input_batch.append_sampled(self._req_ids, sampled_token_ids)
        self._ready = ModelRunnerOutput(req_ids=self._req_ids, sampled_token_ids=sampled_token_ids,
                                        logprobs=logprobs, prompt_logprobs=self._prompt_logprobs,
                                        failed=self._failed)
        return self._ready

    def _sampled_and_logprobs(self) -> tuple[dict[str, int], dict[str, list[TokenLogprobs]]]:
        if not self._host:
            return {}, {}
        tokens, ids, values, ranks = self._host
        sampled = dict(zip(self._sampling_req_ids, tokens.tolist()))
        logprobs = {}
        if values is not None:
            ids, values, ranks = ids.tolist(), values.tolist(), ranks.tolist()
            for row, req_id in enumerate(self._sampling_req_ids):
                k = self._logprobs_wanted[req_id]
                if k is not None:
                    logprobs[req_id] = [TokenLogprobs(ids[row][:k + 1], values[row][:k + 1], ranks[row][:k + 1])]
        return sampled, logprobs
