"""LLM: vLLM's offline API (generate / chat) over an in-process engine core.

    llm = LLM("Qwen/Qwen2.5-VL-3B-Instruct")
    outputs = llm.generate([{"prompt": "...<|image_pad|>...", "multi_modal_data": {"image": pil}}],
                           SamplingParams(max_tokens=64))

LLM *has* a Frontend (prompts -> EngineRequests) and an InprocClient (the core, stepped here);
engine.detokenizer turns the core's outputs into RequestOutputs, returned in input order. The
prompts are built on worker threads (engine.request_builder) while the core steps on those built.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from engine.client import InprocClient
from engine.config_loader import create_engine_config
from engine.detokenizer import OutputProcessor
from engine.frontend import Frontend, MediaInput, is_video_with_metadata
from engine.outputs import RequestOutput
from engine.protocol import EngineRequest
from engine.request_builder import RequestBuilder, num_build_workers
from engine.sampling_params import SamplingParams
from vision.inputs import IMAGE, VIDEO
from vision.video import VideoFrames

_Build = Callable[[], tuple[EngineRequest, str | None]]   # one prompt -> (request, its text), on a build thread


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, dtype: Any = "auto", device: str = "auto",
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, block_size: int = 16, enable_prefix_caching: bool = True,
                 num_gpu_blocks_override: int | None = None, seed: int = 0,
                 limit_mm_per_prompt: dict[str, int] | None = None, tensor_parallel_size: int = 1,
                 enforce_eager: bool = False, trust_remote_code: bool = False, **kwargs: Any):
        # file:// media in chat messages: only under this directory (vLLM's flag); None refuses them.
        self._allowed_local_media_path = kwargs.pop("allowed_local_media_path", None)
        self.config = create_engine_config(
            model=model, tokenizer=tokenizer, dtype=dtype, device=device, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
            enable_prefix_caching=enable_prefix_caching, num_gpu_blocks_override=num_gpu_blocks_override,
            seed=seed, limit_mm_per_prompt=limit_mm_per_prompt, tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager, trust_remote_code=trust_remote_code, **kwargs)
        self.frontend = Frontend(self.config)
        self.client = InprocClient(self.config)
        self._request_counter = itertools.count()
        self._media_fetcher: Any = None   # vision.fetch.MediaFetcher, made on the first URL
        self._media_fetcher_lock = threading.Lock()   # the first URLs may come on several build threads

    def get_tokenizer(self):
        return self.frontend.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: the model's generation-config defaults (--generation-config), used when
        `generate`/`chat` get no sampling_params."""
        return SamplingParams.from_optional(**self.config.model_config.get_diff_sampling_param())

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a str, {"prompt_token_ids": [...]}, {"prompt": str, "multi_modal_data": {"image": PIL |
        [PIL], "video": frames | [frames]}, "mm_processor_kwargs": {...}}, or a list of these."""
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params_list = self._params_per_prompt(sampling_params, len(prompt_list))
        return self._run(self._prompt_builds(prompt_list, params_list), use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None, mm_processor_kwargs: dict | None = None,
             chat_template_content_format: str = "auto") -> list[RequestOutput]:
        """messages: one OpenAI-format conversation (list of dicts) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params_list = self._params_per_prompt(sampling_params, len(conversations))
        render = functools.partial(
            self.frontend.render_chat, tools=tools, chat_template=chat_template,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs, content_format=chat_template_content_format)
        builds = [functools.partial(self._request_from_chat, render, conversation, params, self._next_id(),
                                    self.frontend.draw_seed(params), mm_processor_kwargs)
                  for conversation, params in zip(conversations, params_list)]
        return self._run(builds, use_tqdm)

    def beam_search(self, prompts, params: BeamSearchParams, lora_request=None, use_tqdm: bool = False,
                    concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search, run inside the engine (engine/beam_search.py): prompts as for
        generate (str, {"prompt_token_ids"}, {"prompt", "multi_modal_data"}); one BeamSearchOutput per
        prompt with params.beam_width sequences, best first."""
        if lora_request is not None:
            raise ValueError("lora_request: LoRA adapters are not supported")
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        sampling_params = params.to_sampling_params()
        step = concurrency_limit or max(1, len(prompt_list))
        outputs = []
        for start in range(0, len(prompt_list), step):
            chunk = prompt_list[start:start + step]
            results = self._run(self._prompt_builds(chunk, [sampling_params] * len(chunk)), use_tqdm)
            outputs += [self._beam_search_output(result) for result in results]
        return outputs

    def _beam_search_output(self, result: RequestOutput) -> BeamSearchOutput:
        tokenizer = self.frontend.tokenizer
        sequences = []
        for completion in result.outputs:
            tokens = list(result.prompt_token_ids) + list(completion.token_ids)
            sequences.append(BeamSearchSequence(
                tokens=tokens, logprobs=completion.logprobs or [], cum_logprob=completion.cumulative_logprob,
                text=tokenizer.decode(tokens), finish_reason=completion.finish_reason,
                stop_reason=completion.stop_reason))
        return BeamSearchOutput(sequences)

    def _next_id(self) -> str:
        return str(next(self._request_counter))

    def _params_per_prompt(self, sampling_params, num_prompts: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        params_list = list(sampling_params)
        if len(params_list) != num_prompts:
            raise ValueError(f"sampling_params: {len(params_list)} given for {num_prompts} prompts")
        return params_list

    # ---------------------------------------------------------------- prompts -> requests

    def _prompt_builds(self, prompts: list, params_list: list[SamplingParams]) -> list[_Build]:
        """One build per prompt, for the worker threads. Request ids and fallback seeds are drawn
        here, in input order, so neither depends on which thread finishes first."""
        return [functools.partial(self._request_from_prompt, prompt, params, self._next_id(),
                                  self.frontend.draw_seed(params))
                for prompt, params in zip(prompts, params_list)]

    def _request_from_chat(self, render: Callable[[list[dict]], Any], conversation: list[dict],
                           params: SamplingParams, request_id: str, seed: int | None,
                           mm_processor_kwargs: dict | None) -> tuple[EngineRequest, str | None]:
        rendered = render(conversation)
        self.frontend.check_media_counts(rendered.media)  # before fetching anything
        media = [self._media_input(ref) for ref in rendered.media]
        request = self.frontend.make_request(request_id, rendered.prompt, media, params, mm_processor_kwargs,
                                             add_special_tokens=False, seed=seed)
        return request, rendered.prompt

    def _request_from_prompt(self, prompt, params: SamplingParams, request_id: str,
                             seed: int | None = None) -> tuple[EngineRequest, str | None]:
        """seed: for params that set none (Frontend.draw_seed); None draws one now."""
        if isinstance(prompt, str):
            return self.frontend.make_request(request_id, prompt, [], params, seed=seed), prompt
        if not isinstance(prompt, dict):
            raise ValueError(f"a prompt must be a str or a dict, got {type(prompt).__name__}")
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs"})
        if unknown:
            raise ValueError(f"unknown prompt key(s): {', '.join(unknown)}")
        if "prompt_token_ids" in prompt:
            text_or_ids = list(prompt["prompt_token_ids"])
        elif "prompt" in prompt:
            text_or_ids = prompt["prompt"]
        else:
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        media = self._media_from_dict(prompt.get("multi_modal_data") or {})
        if {m.modality for m in media} == {IMAGE, VIDEO}:
            if isinstance(text_or_ids, str):
                text_or_ids = self.frontend.tokenizer.encode(text_or_ids)
            media = self._in_prompt_order(text_or_ids, media)
        request = self.frontend.make_request(request_id, text_or_ids, media, params,
                                             prompt.get("mm_processor_kwargs"), seed=seed)
        return request, prompt.get("prompt")

    @staticmethod
    def _media_from_dict(multi_modal_data: dict) -> list[MediaInput]:
        unknown = sorted(set(multi_modal_data) - {IMAGE, VIDEO})
        if unknown:
            raise ValueError(f"multi_modal_data: unsupported modality {unknown[0]!r} (supported: image, video)")
        media = []
        for modality in (IMAGE, VIDEO):
            items = multi_modal_data.get(modality)
            if items is None:
                continue
            if (not isinstance(items, (list, tuple)) or is_video_with_metadata(items)
                    or (modality == VIDEO and items and not _is_video(items[0]))):
                items = [items]  # one image / one video (an array, a list of PIL frames, (frames, metadata))
            media += [MediaInput(modality, item) for item in items]
        return media

    def _in_prompt_order(self, token_ids: list[int], media: list[MediaInput]) -> list[MediaInput]:
        """Images and videos interleaved as their placeholder tokens appear in the prompt."""
        hf_config = self.config.model_config.hf_config
        token_to_modality = {getattr(hf_config, "image_token_id", None): IMAGE,
                             getattr(hf_config, "video_token_id", None): VIDEO}
        sequence = [token_to_modality[t] for t in token_ids if t in token_to_modality]
        queues = {modality: [m for m in media if m.modality == modality] for modality in (IMAGE, VIDEO)}
        if any(sequence.count(modality) != len(items) for modality, items in queues.items()):
            raise ValueError("the prompt's image/video placeholders do not match multi_modal_data "
                             f"({sequence.count(IMAGE)} image and {sequence.count(VIDEO)} video placeholders)")
        return [queues[modality].pop(0) for modality in sequence]

    def _media_input(self, ref) -> MediaInput:
        data = ref.data
        if data is None:
            data = self._fetch_and_decode(ref.modality, ref.url)
        return MediaInput(ref.modality, data, uuid=ref.uuid, detail=ref.detail)

    def _fetch_and_decode(self, modality: str, url: str):
        from vision.fetch import FetchConfig, MediaFetcher
        from vision.image import decode_image
        from vision.video import decode_video

        with self._media_fetcher_lock:
            if self._media_fetcher is None:
                self._media_fetcher = MediaFetcher(FetchConfig(allowed_local_media_path=self._allowed_local_media_path))
        data = self._media_fetcher.fetch_sync(url)
        if modality == IMAGE:
            return decode_image(data)
        return decode_video(data, **self.frontend.video_sampling_kwargs(None))  # the model's frame sampling

    # ---------------------------------------------------------------- the engine loop

    def _run(self, builds: Sequence[_Build], use_tqdm: bool) -> list[RequestOutput]:
        """Builds the requests on worker threads and steps the core on those built (added in input
        order) until each is finished; results in input order. A prompt that cannot be built
        raises its ValueError, after the requests already added are aborted. A request that failed
        in the engine raises ValueError after the others completed."""
        processor = OutputProcessor(self.frontend.tokenizer)
        results: list[RequestOutput | None] = [None] * len(builds)
        position: dict[str, int] = {}
        with (RequestBuilder(builds, num_build_workers(len(builds))) as builder,
              tqdm(total=len(builds), desc="Processed prompts", disable=not use_tqdm) as progress):
            try:
                while builder.num_pending or processor.states:
                    self._add_built(builder, processor, position, wait=not processor.states)
                    if not self.client.has_unfinished_requests():
                        raise RuntimeError(f"the engine finished without completing {list(processor.states)}")
                    states, stop_string_hits = processor.process(self.client.step().outputs)
                    self.client.abort_requests(stop_string_hits)
                    for state in (s for s in states if s.finished):
                        results[position[state.request.req_id]] = state.make_output()
                        progress.update(1)
            finally:
                for req_id in list(processor.states):  # interrupted or a bad prompt: free what was added
                    self.client.abort_requests(processor.abort(req_id)[1])
        failed = [(i, out.error) for i, out in enumerate(results) if out.error]
        if failed:
            raise ValueError(f"prompt {failed[0][0]}: {failed[0][1]}")
        return results

    def _add_built(self, builder: RequestBuilder, processor: OutputProcessor, position: dict[str, int],
                   wait: bool) -> None:
        """Adds the requests built so far to the core, in input order. wait (the core is idle):
        first waits until they fill one step's token budget or every prompt is built, so an idle
        core's next step is as full as if all had been built before it."""
        budget = self.config.scheduler_config.max_num_batched_tokens
        num_tokens = 0
        while True:
            for index, (request, prompt) in builder.take_ready(wait=wait):
                position[request.req_id] = index
                for child in processor.add(request, prompt).children:
                    self.client.add_request(child)
                num_tokens += len(request.prompt_token_ids)
            if not wait or not builder.num_pending or num_tokens >= budget:
                return


def _is_video(item) -> bool:
    """One video: a [T, H, W, 3] array, a VideoFrames, a list of PIL frames or (frames, metadata)."""
    import numpy as np

    if isinstance(item, np.ndarray):
        return item.ndim == 4
    return isinstance(item, (VideoFrames, list)) or is_video_with_metadata(item)
