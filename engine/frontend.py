"""Prompt (text or token ids) + decoded media -> a validated EngineRequest, with the media's
placeholder tokens expanded; and OpenAI chat messages -> prompt text (engine.chat_render).

Used in the API process by the HTTP routes (app) and by the offline API (engine.llm). Every
invalid input raises ValueError with a user-facing message here, before the engine sees it.
"""

from __future__ import annotations

import pathlib
import random
import threading
import time
from dataclasses import dataclass

import msgspec
import numpy as np
from PIL import Image

from engine.admission import MediaAdmission
from engine.chat_render import RenderedChat, render_chat
from engine.config import EngineConfig, text_config
from engine.protocol import EngineRequest
from engine.sampling_params import SamplingParams
from engine.structured_output.resolve import resolve_structured_outputs
from vision.image import to_rgb
from vision.inputs import IMAGE, MODALITIES, VIDEO
from vision.video import VideoFrames, video_from_frames, video_from_metadata


@dataclass(frozen=True)
class MediaInput:
    modality: str                 # "image" | "video"
    data: object                  # PIL.Image | vision.video.VideoFrames | uint8 frames [T, H, W, 3]
                                  # | (frames, vLLM's video metadata dict)
    uuid: str | None = None
    detail: str | None = None     # image_url.detail


def load_tokenizer(model_config):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_config.tokenizer, trust_remote_code=model_config.trust_remote_code,
                                             revision=model_config.tokenizer_revision)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--tokenizer: cannot load a tokenizer from {model_config.tokenizer}: {exc}") from exc


def is_video_with_metadata(data: object) -> bool:
    """vLLM's `(frames, {"fps": ..., "frames_indices": ..., "total_num_frames": ...})` form."""
    return isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], dict)


def as_video_frames(data: object) -> VideoFrames:
    """A decoded video, `(frames, metadata)`, or bare frames (taken as 24 per second, as transformers)."""
    if isinstance(data, VideoFrames):
        return data
    if is_video_with_metadata(data):
        return video_from_metadata(*data)  # type: ignore[misc]
    return video_from_frames(data)  # type: ignore[arg-type]


class Frontend:
    def __init__(self, config: EngineConfig, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model_config)
        self.chat_template = self._init_chat_template()
        self._processor = None  # built on the first request with media
        self._processor_lock = threading.Lock()   # requests are built on several threads (engine.llm)
        hf_config = config.model_config.hf_config
        self.vocab_size = int(getattr(text_config(hf_config), "vocab_size", 0) or len(self.tokenizer))
        self.is_multimodal = getattr(hf_config, "vision_config", None) is not None
        self._seed_rng = random.Random(config.model_config.seed)

    def _init_chat_template(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        if template:
            return template
        path = pathlib.Path(self.config.model_config.path) / "chat_template.jinja"
        return path.read_text(encoding="utf-8") if path.is_file() else None

    @property
    def processor(self):
        if self._processor is None:
            with self._processor_lock:
                if self._processor is None:
                    from vision.processors import get_processor

                    model_config = self.config.model_config
                    self._processor = get_processor(model_config.path, model_config.hf_config,
                                                    self.config.multimodal_config.mm_processor_kwargs or None)
        return self._processor

    def render_chat(self, messages: list[dict], *, tools=None, chat_template: str | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    chat_template_kwargs: dict | None = None, content_format: str = "auto") -> RenderedChat:
        return render_chat(self.tokenizer, messages, chat_template=chat_template or self.chat_template, tools=tools,
                           content_format=content_format,
                           add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message,
                           chat_template_kwargs=chat_template_kwargs)

    def media_admission(self, prompt: str | list[int], num_items: int, mm_processor_kwargs: dict | None = None,
                        add_special_tokens: bool = False) -> MediaAdmission:
        """A running token count for this prompt's media, checked as each item's size is known."""
        num_text_tokens = len(prompt) if isinstance(prompt, list) else len(
            self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        return MediaAdmission(self.processor, num_text_tokens, num_items, self.config.model_config.max_model_len,
                              self.config.multimodal_config.encoder_cache_size, mm_processor_kwargs or None)

    def video_sampling_kwargs(self, mm_processor_kwargs: dict | None) -> dict:
        """decode_video keyword arguments (fps, frame counts) from the request's mm_processor_kwargs
        over the server's --media-io-kwargs video settings."""
        if not self.is_multimodal:
            return {}
        media_io = self.config.multimodal_config.media_io_kwargs.get(VIDEO, {})
        return self.processor.video_sampling_kwargs({**media_io, **(mm_processor_kwargs or {})} or None)

    def draw_seed(self, sampling_params: SamplingParams) -> int | None:
        """The seed make_request gives a request whose params (with the generation-config defaults)
        set none, drawn now from the frontend's seeded RNG; None when they set one. Callers that
        build requests on several threads draw in input order and pass it to make_request, so the
        seeds do not depend on which thread runs first."""
        if sampling_params.with_defaults(self.config.model_config.default_sampling_params).seed is not None:
            return None
        return self._seed_rng.getrandbits(63)

    def make_request(self, request_id: str, prompt: str | list[int], media: list[MediaInput],
                     sampling_params: SamplingParams, mm_processor_kwargs: dict | None = None, *,
                     add_special_tokens: bool = True, cache_salt: str | None = None,
                     arrival_time: float | None = None, seed: int | None = None) -> EngineRequest:
        """ValueError (user-facing message) on any invalid input. `add_special_tokens`: False for a
        prompt rendered from a chat template (the template wrote them already). Sampling fields the
        request left unset take the model's generation-config defaults (--generation-config).
        `seed`: the one for params that set none (from draw_seed); None draws it here."""
        defaults = self.config.model_config.default_sampling_params
        sampling_params = sampling_params.with_defaults(defaults).validate()
        self._check_num_logprobs(sampling_params)
        self._check_token_ids(sampling_params)
        token_ids = self._truncate(self._tokenize(prompt, add_special_tokens), sampling_params, media)
        self.check_media_counts(media)
        mm_items = []
        if media:
            token_ids, mm_items = self._expand_media(token_ids, media, mm_processor_kwargs)
        params = self._complete_sampling_params(sampling_params, len(token_ids), seed)
        return EngineRequest(req_id=request_id, prompt_token_ids=token_ids, sampling_params=params,
                             mm_items=mm_items, arrival_time=time.time() if arrival_time is None else arrival_time,
                             cache_salt=cache_salt)

    def _truncate(self, token_ids: list[int], params: SamplingParams, media: list[MediaInput]) -> list[int]:
        """truncate_prompt_tokens (vLLM): the prompt's last k tokens; -1: the last max_model_len."""
        keep = params.truncate_prompt_tokens
        if keep is None:
            return token_ids
        if media:   # cutting the prompt could cut an image's or a video's placeholder tokens
            raise ValueError("truncate_prompt_tokens is not supported for prompts with images or videos")
        return token_ids[-(self.config.model_config.max_model_len if keep == -1 else keep):]

    def _check_token_ids(self, params: SamplingParams) -> None:
        """logit_bias and allowed_token_ids name tokens of this vocabulary."""
        for name, ids in (("logit_bias", params.logit_bias or ()),
                          ("allowed_token_ids", params.allowed_token_ids or ())):
            bad = [token_id for token_id in ids if not 0 <= token_id < self.vocab_size]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is out of vocabulary (size {self.vocab_size})")

    def _check_num_logprobs(self, params: SamplingParams) -> None:
        max_logprobs = self.config.model_config.max_logprobs
        limit = self.vocab_size if max_logprobs == -1 else max_logprobs
        for name, asked in (("logprobs (top_logprobs)", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if asked is not None and asked > limit:
                raise ValueError(f"{name}: {asked} requested, more than the server allows "
                                 f"(--max-logprobs {max_logprobs})")

    def _tokenize(self, prompt: str | list[int], add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            token_ids = list(prompt)
            bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids: token id {bad[0]} is out of vocabulary "
                                 f"(vocab size {self.vocab_size})")
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not token_ids:
            raise ValueError("prompt must not be empty")
        return token_ids

    def check_media_counts(self, media: list) -> None:
        """MediaInputs or chat MediaRefs (anything with .modality) against the model and limits."""
        if media and not self.is_multimodal:
            raise ValueError(f"{self.config.model_config.architecture} is a text-only model; "
                             f"it does not accept {media[0].modality} inputs")
        for modality in MODALITIES:
            count = sum(1 for item in media if item.modality == modality)
            limit = self.config.multimodal_config.max_items(modality)
            if count > limit:
                raise ValueError(f"At most {limit} {modality}(s) may be provided in one prompt, got {count} "
                                 f"(--limit-mm-per-prompt {modality}={limit})")
        unknown = [item.modality for item in media if item.modality not in MODALITIES]
        if unknown:
            raise ValueError(f"unsupported modality {unknown[0]!r} (supported: {', '.join(MODALITIES)})")

    def _expand_media(self, token_ids: list[int], media: list[MediaInput], mm_processor_kwargs: dict | None):
        """Processes the items (in prompt order) and expands their placeholders in the prompt."""
        mm_kwargs = mm_processor_kwargs or None  # per request; the server's are in the processor
        processed = [self._process_one(item, mm_kwargs) for item in media]
        token_ids, placeholders = self.processor.expand_placeholders(token_ids, processed)
        items = [one.to_item(placeholder) for one, placeholder in zip(processed, placeholders)]
        return list(token_ids), sorted(items, key=lambda item: item.placeholder.offset)

    def _process_one(self, item: MediaInput, mm_kwargs: dict | None):
        if item.modality == IMAGE:
            image = item.data
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            if not isinstance(image, Image.Image):
                raise ValueError(f"an image must be a PIL image, got {type(item.data).__name__}")
            return self.processor.process_image(to_rgb(image), mm_kwargs, item.detail)
        video, metadata = self._video(item.data, mm_kwargs)
        return self.processor.process_video(video.frames, video.fps, mm_kwargs, metadata=metadata)

    def _video(self, data: object, mm_kwargs: dict | None) -> tuple[VideoFrames, VideoFrames | None]:
        """-> (frames, their source metadata or None): VideoFrames (decoded: they know their source),
        vLLM's (frames, metadata dict), or bare frames (no metadata; Qwen3-VL refuses those)."""
        if isinstance(data, VideoFrames):
            return data, data
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], dict):
            video = video_from_metadata(data[0], data[1], self.video_sampling_kwargs(mm_kwargs))
            return video, video
        return video_from_frames(data), None  # type: ignore[arg-type]  # checked by video_from_frames

    def _complete_sampling_params(self, params: SamplingParams, prompt_len: int,
                                  seed: int | None) -> SamplingParams:
        """vLLM's length rules; max_tokens None -> what is left of max_model_len; a seed for every
        request (n>1 children use seed+i, so they differ)."""
        max_model_len = self.config.model_config.max_model_len
        if prompt_len + 1 > max_model_len:
            raise ValueError(f"The prompt (length {prompt_len}) is longer than the maximum model length of "
                             f"{max_model_len}; it must leave room for at least one generated token. "
                             f"Make sure that `max_model_len` exceeds the text plus multimodal tokens.")
        max_tokens = params.max_tokens
        if max_tokens is None:  # unset: what is left, capped by the generation config's max_new_tokens
            max_tokens = min(max_model_len - prompt_len,
                             self.config.model_config.default_sampling_params.get("max_tokens", max_model_len))
        if prompt_len + max_tokens > max_model_len:
            raise ValueError(f"This model's maximum context length is {max_model_len} tokens. However, you "
                             f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
                             f"{max_tokens} in the completion). Please reduce the length of the messages or "
                             f"completion.")
        if params.seed is not None:
            seed = params.seed
        elif seed is None:
            seed = self._seed_rng.getrandbits(63)
        structured = params.structured_outputs
        if structured is not None:
            structured = resolve_structured_outputs(structured, self.config.structured_outputs_config)
        return msgspec.structs.replace(params, max_tokens=max_tokens, seed=seed, structured_outputs=structured)
