"""POST /tokenize (a prompt, or chat messages whose media count their placeholder tokens) and
POST /detokenize. vLLM's request and response shapes.

Caller: Litestar (registered by app.server).
"""

from __future__ import annotations

import asyncio

import msgspec
from litestar import Controller, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from app.auth import require_api_key
from app.media import check_media_counts, load_media, media_plan
from app.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse, random_id
from app.serving import ServingContext
from engine.sampling_params import SamplingParams


async def tokenize_messages(data: TokenizeRequest, serving: ServingContext) -> list[int]:
    """Render + fetch + process media exactly as a chat request would; the prompt ids are the answer."""
    frontend = serving.client.frontend
    check_media_counts(data.messages, serving.config.limits)
    messages = [msgspec.to_builtins(m) for m in data.messages]
    rendered = frontend.render_chat(messages, chat_template=serving.chat_template,
                                    add_generation_prompt=data.add_generation_prompt,
                                    continue_final_message=data.continue_final_message,
                                    chat_template_kwargs=data.chat_template_kwargs,
                                    content_format=serving.config.chat_template_content_format)
    media = await load_media(rendered.media, serving.fetcher, serving.config.limits,
                             decode_limits=serving.config.decode_limits(),
                             plan=media_plan(frontend, rendered, data.mm_processor_kwargs),
                             pool=serving.image_decoder)
    request = await asyncio.to_thread(frontend.make_request, random_id("tokenize"), rendered.prompt, media,
                                      SamplingParams(max_tokens=1), data.mm_processor_kwargs, add_special_tokens=False)
    return list(request.prompt_token_ids)


class TokenizeController(Controller):
    path = "/"
    guards = [require_api_key]
    tags = ["tokenize"]

    @post("/tokenize", status_code=200)
    async def tokenize(
            self, data: JSONBody[TokenizeRequest], serving: NamedDependency[ServingContext],
    ) -> TokenizeResponse:
        serving.resolve_model(data.model)
        if (data.prompt is None) == (data.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if data.messages is not None:
            tokens = await tokenize_messages(data, serving)
        else:
            tokens = serving.client.frontend.tokenizer.encode(data.prompt, add_special_tokens=data.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=serving.max_model_len, tokens=tokens)

    @post("/detokenize", status_code=200)
    async def detokenize(
            self, data: JSONBody[DetokenizeRequest], serving: NamedDependency[ServingContext],
    ) -> DetokenizeResponse:
        serving.resolve_model(data.model)
        vocab_size = serving.client.frontend.vocab_size
        bad = [t for t in data.tokens if t >= vocab_size]
        if bad:
            raise ValueError(f"tokens: id {bad[0]} is out of vocabulary (vocab size {vocab_size})")
        return DetokenizeResponse(prompt=serving.client.frontend.tokenizer.decode(data.tokens))
