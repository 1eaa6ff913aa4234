"""Early admission of a request's media: as soon as an item's size is known (an image's header,
a video's sampled frame count), its placeholder tokens are added to the request's running total
and checked against --max-model-len and the encoder cache, so a request that can never fit is
refused at once with the numbers, before the rest of its media is decoded or it waits in a queue.

Caller: app.media and engine.llm (`Frontend.media_admission(...)` builds one per request). The
exact check on the expanded prompt still runs later in Frontend.make_request; this one only
refuses early, so it never refuses what the exact check would accept: the text estimate subtracts
a generous allowance for the placeholder text each item replaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vision.processors import MediaProcessor

# Placeholder text an item replaces in the rendered prompt ("<|image_pad|>", "<image>\n", ...) is
# never more tokens than this; the estimate of the text alone subtracts it per item.
_MAX_PLACEHOLDER_TOKENS = 8


@dataclass
class MediaAdmission:
    processor: MediaProcessor         # num_tokens_for_size
    num_text_tokens: int              # rendered prompt tokens, placeholders included
    num_items: int
    max_model_len: int
    encoder_cache_size: int | None
    mm_kwargs: dict | None = None
    num_media_tokens: int = field(default=0, init=False)

    def admit(self, modality: str, width: int, height: int, num_frames: int = 1, detail: str | None = None) -> int:
        """Counts one item; ValueError naming its size and the limit when the request cannot fit."""
        tokens = self.processor.num_tokens_for_size(modality, height, width, num_frames, self.mm_kwargs, detail=detail)
        size = f"{modality} {width}×{height}" + (f"×{num_frames} frames" if modality == "video" else "")
        if self.encoder_cache_size is not None and tokens > self.encoder_cache_size:
            raise ValueError(f"{size} → {tokens:,} tokens; the encoder cache holds {self.encoder_cache_size:,} "
                             f"(--encoder-cache-size)")
        self.num_media_tokens += tokens
        text = max(self.num_text_tokens - _MAX_PLACEHOLDER_TOKENS * self.num_items, 0)
        needed = text + self.num_media_tokens + 1  # at least one generated token
        if needed > self.max_model_len:
            raise ValueError(f"{size} → {tokens:,} tokens; with the text and the other media the prompt needs at "
                             f"least {needed:,} tokens; limit {self.max_model_len:,} (--max-model-len)")
        return tokens
