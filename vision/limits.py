"""Per-prompt media limits (`--limit-mm-per-prompt`): parse the flag once, then reject a request
whose media count or declared size is over a limit BEFORE anything is fetched or decoded.

Callers: `app.cli` parses the flag (`MultiModalLimits.parse`); `app.routes.chat` and
`engine.frontend` call `check_counts` on the media references of a request, then `check_size`
once a header (image size, video frame size / frame count) is known.

Accepted forms (vLLM's):
    image=5,video=5
    {"image": 5, "video": 1}
    {"image": {"count": 5, "width": 512, "height": 512}, "video": {"count": 1, "num_frames": 32}}
A modality that is not named keeps vLLM's default of 999 items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from vision.inputs import MODALITIES

DEFAULT_MAX_ITEMS = 999
_FLAG = "--limit-mm-per-prompt"
_SIZE_KEYS = {"image": ("width", "height"), "video": ("width", "height", "num_frames")}


@dataclass(frozen=True)
class ModalityLimit:
    count: int = DEFAULT_MAX_ITEMS
    # Object form only: the largest width / height (pixels) and, for videos, frame count.
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None


@dataclass(frozen=True)
class MultiModalLimits:
    per_modality: dict[str, ModalityLimit] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: str | dict | None) -> "MultiModalLimits":
        """Parse the flag's value (string or already-decoded JSON object); None / "" -> defaults."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return cls()
        raw = decode_limit_flag(value)
        return cls({modality: _modality_limit(modality, spec) for modality, spec in raw.items()})

    @classmethod
    def from_config_fields(cls, limit_per_prompt: dict[str, int],
                           limit_sizes: dict[str, dict[str, int]]) -> "MultiModalLimits":
        """Rebuild from `engine.config.MultiModalConfig`'s two fields."""
        names = set(limit_per_prompt) | set(limit_sizes)
        spec = {m: {"count": limit_per_prompt.get(m, DEFAULT_MAX_ITEMS), **limit_sizes.get(m, {})} for m in names}
        return cls.parse(spec)

    def limit_per_prompt(self) -> dict[str, int]:
        """modality -> count, for `MultiModalConfig.limit_per_prompt`."""
        return {m: lim.count for m, lim in self.per_modality.items()}

    def limit_sizes(self) -> dict[str, dict[str, int]]:
        """modality -> {width, height, num_frames} (only those set), for `MultiModalConfig.limit_sizes`."""
        sizes = {}
        for modality, lim in self.per_modality.items():
            bounds = {k: getattr(lim, k) for k in ("width", "height", "num_frames") if getattr(lim, k) is not None}
            if bounds:
                sizes[modality] = bounds
        return sizes

    def max_items(self, modality: str) -> int:
        return self.per_modality.get(modality, ModalityLimit()).count

    def check_counts(self, counts: dict[str, int]) -> None:
        """Raise ValueError if any modality has more items than allowed (or is unknown)."""
        for modality, num_items in counts.items():
            if modality not in MODALITIES:
                raise ValueError(f"unsupported media type {modality!r} (supported: {', '.join(MODALITIES)})")
            limit = self.max_items(modality)
            if num_items > limit:
                if limit == 0:
                    raise ValueError(f"{modality} inputs are disabled on this server ({_FLAG} {modality}=0)")
                raise ValueError(f"at most {limit} {modality}(s) per prompt, got {num_items}")

    def check_size(self, modality: str, *, width: int, height: int, num_frames: int | None = None) -> None:
        """Raise ValueError if a decoded/declared item exceeds the object form's size bounds."""
        lim = self.per_modality.get(modality, ModalityLimit())
        for name, value in (("width", width), ("height", height), ("num_frames", num_frames)):
            bound = getattr(lim, name)
            if bound is not None and value is not None and value > bound:
                raise ValueError(f"{modality} {name} {value} exceeds this server's limit of {bound} "
                                 f"({_FLAG})")


def decode_limit_flag(value: str | dict) -> dict:
    """The flag's value as an object: 'image=5,video=1' -> {"image": "5", "video": "1"}, a JSON
    text decoded, an object as is (not yet validated: MultiModalLimits.parse does that)."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{_FLAG}: expected 'image=N,video=N' or a JSON object, got {type(value).__name__}")
    if not value.strip().startswith("{"):
        return _parse_pairs(value)
    try:
        raw = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{_FLAG}: invalid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{_FLAG}: the JSON form must be an object such as {{\"image\": 5}}")
    return raw


def _parse_pairs(text: str) -> dict[str, str]:
    raw = {}
    for part in text.split(","):
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{_FLAG}: expected 'modality=count' pairs such as image=5,video=1, got {part!r}")
        raw[key.strip()] = val.strip()
    return raw


def _modality_limit(modality: str, spec: Any) -> ModalityLimit:
    if modality not in MODALITIES:
        raise ValueError(f"{_FLAG}: unknown modality {modality!r} (supported: {', '.join(MODALITIES)})")
    if not isinstance(spec, dict):
        return ModalityLimit(count=_non_negative_int(modality, "count", spec))
    unknown = set(spec) - {"count", *_SIZE_KEYS[modality]}
    if unknown:
        raise ValueError(f"{_FLAG}: unknown key(s) {sorted(unknown)} for {modality} "
                         f"(allowed: count, {', '.join(_SIZE_KEYS[modality])})")
    sizes = {k: _positive_int(modality, k, spec[k]) for k in _SIZE_KEYS[modality] if spec.get(k) is not None}
    count = _non_negative_int(modality, "count", spec.get("count", DEFAULT_MAX_ITEMS))
    return ModalityLimit(count=count, **sizes)


def _non_negative_int(modality: str, key: str, value: Any) -> int:
    number = _as_int(modality, key, value)
    if number < 0:
        raise ValueError(f"{_FLAG}: {modality} {key} must be >= 0, got {number}")
    return number


def _positive_int(modality: str, key: str, value: Any) -> int:
    number = _as_int(modality, key, value)
    if number < 1:
        raise ValueError(f"{_FLAG}: {modality} {key} must be positive, got {number}")
    return number


def _as_int(modality: str, key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{_FLAG}: {modality} {key} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"{_FLAG}: {modality} {key} must be an integer, got {value!r}")
