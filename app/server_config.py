"""ServerConfig: the API server's settings (everything that is not the engine's), frozen and
validated once. Built by app.cli from the flags; read by app.server, app.serving and the routes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vision.fetch import FetchConfig
from vision.limits import MultiModalLimits

if TYPE_CHECKING:   # imported where used: they pull in torch, and `vlserve` binds its port first
    from app.media import DecodeLimits

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True)
class ServerConfig:
    model: str
    host: str = "0.0.0.0"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = ()
    chat_template: str | None = None          # template text (resolved from file / name / inline)
    trust_request_chat_template: bool = False
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    limits: MultiModalLimits = field(default_factory=MultiModalLimits)  # --limit-mm-per-prompt
    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] | None = None
    disable_log_requests: bool = False
    disable_log_stats: bool = False
    uvicorn_log_level: str = "info"
    max_log_len: int | None = None
    max_n: int = 16                           # cap on `n` per request
    max_beam_width: int = 8                   # cap on `n` with use_beam_search
    max_best_of: int = 16                     # cap on best_of (/v1/completions)
    request_max_body_size: int = 64 * 1024 * 1024
    drain_timeout_s: float = 30.0
    # Hardening limits (SECURITY.md lists each with its flag and environment variable).
    allow_private_media_addresses: bool = False
    media_fetch_connect_timeout_s: float = 5.0
    media_fetch_timeout_s: float = 30.0
    max_media_bytes: int = 64 * 1024 * 1024   # per item
    max_concurrent_media_fetches: int = 16
    max_media_redirects: int = 3
    max_image_pixels: int = 64 * 1024 * 1024
    max_video_frame_pixels: int = 8192 * 8192
    max_video_duration_s: float = 3600.0
    max_video_decoded_frames: int = 20_000
    video_decode_timeout_s: float = 30.0
    max_waiting_requests: int = 512
    max_queued_media_bytes: int = 1024 * 1024 * 1024
    request_timeout_s: float = 600.0          # longest wait for the engine's first output
    engine_iteration_timeout_s: float = 120.0  # a busy engine silent this long is taken as hung
    h11_max_incomplete_event_size: int = 16 * 1024  # request line + headers; larger -> 431
    exit_on_engine_death: bool = True
    media_decode_workers: int | None = None   # image decoder processes; None: a quarter of the cores; 0: threads
    # vLLM's HTTP flags: TLS, CORS (vLLM's defaults: any origin, method and header), a path prefix
    # behind a proxy, the role of chat replies, how message content reaches the chat template.
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    root_path: str | None = None
    response_role: str = "assistant"
    chat_template_content_format: str = "auto"

    def __post_init__(self) -> None:
        positive = ("max_n", "max_beam_width", "max_best_of", "request_max_body_size", "max_waiting_requests",
                    "max_queued_media_bytes", "request_timeout_s", "h11_max_incomplete_event_size",
                    "engine_iteration_timeout_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.removesuffix('_s').replace('_', '-')}: must be positive, "
                                 f"got {getattr(self, name)}")
        self.fetch_config()  # validates the fetch flags
        self.decode_limits()
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port: must be in [0, 65535], got {self.port}")
        if self.media_decode_workers is not None and self.media_decode_workers < 0:
            raise ValueError(f"--media-decode-workers: must be >= 0, got {self.media_decode_workers}")
        if self.uvicorn_log_level not in LOG_LEVELS:
            raise ValueError(f"--uvicorn-log-level: must be one of {', '.join(LOG_LEVELS)}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser (supported: hermes)")
        if self.tool_call_parser not in (None, "hermes"):
            raise ValueError(f"--tool-call-parser: {self.tool_call_parser!r} is not supported (supported: hermes)")
        from engine.chat_render import CONTENT_FORMATS

        if self.chat_template_content_format not in CONTENT_FORMATS:
            raise ValueError(f"--chat-template-content-format: must be one of {', '.join(CONTENT_FORMATS)}, "
                             f"got {self.chat_template_content_format!r}")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("--ssl-keyfile and --ssl-certfile must be given together")

    @property
    def served_names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model,)

    def fetch_config(self) -> FetchConfig:
        try:
            return FetchConfig(allowed_local_media_path=self.allowed_local_media_path,
                               allowed_media_domains=self.allowed_media_domains or (),
                               allow_private_addresses=self.allow_private_media_addresses,
                               connect_timeout=self.media_fetch_connect_timeout_s,
                               total_timeout=self.media_fetch_timeout_s, max_bytes=self.max_media_bytes,
                               max_redirects=self.max_media_redirects,
                               max_concurrent=self.max_concurrent_media_fetches)
        except ValueError as exc:
            raise ValueError(f"media fetch flags: {exc}") from None

    def decode_limits(self) -> DecodeLimits:
        from app.media import DecodeLimits
        from vision.video import VideoDecodeLimits

        if self.max_image_pixels < 1:
            raise ValueError(f"--max-image-pixels: must be positive, got {self.max_image_pixels}")
        try:
            video = VideoDecodeLimits(max_pixels=self.max_video_frame_pixels,
                                      max_duration_s=self.max_video_duration_s,
                                      max_decoded_frames=self.max_video_decoded_frames,
                                      max_decode_s=self.video_decode_timeout_s)
        except ValueError as exc:
            raise ValueError(f"video limit flags: {exc}") from None
        return DecodeLimits(max_image_pixels=self.max_image_pixels, video=video)
