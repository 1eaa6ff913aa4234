"""`vlserve serve MODEL [flags]` / `python -m app --model MODEL [flags]`: vLLM's flag names ->
(engine kwargs for `EngineConfig.create`, ServerConfig). Parsing only; `main` then hands both to
app.server.serve.

Every flag takes both spellings (`--max-model-len` and `--max_model_len`). Engine kwargs hold only
the flags the user gave, so the engine's defaults stay the engine's. A flag that is accepted but
not supported with the given value fails here with a message naming it, never silently.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from dataclasses import dataclass, field

from app.chat_templates import resolve_chat_template
from app.media import DecodeLimits
from vision.fetch import FetchConfig
from vision.limits import MultiModalLimits
from vision.video import VideoDecodeLimits

UNSET = None  # argparse default for engine flags: "not given" -> left out of the engine kwargs
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

    def __post_init__(self) -> None:
        positive = ("max_n", "max_beam_width", "max_best_of", "request_max_body_size", "max_waiting_requests", "max_queued_media_bytes",
                    "request_timeout_s", "h11_max_incomplete_event_size", "engine_iteration_timeout_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.removesuffix('_s').replace('_', '-')}: must be positive, "
                                 f"got {getattr(self, name)}")
        self.fetch_config()  # validates the fetch flags
        self.decode_limits()
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port: must be in [0, 65535], got {self.port}")
        if self.uvicorn_log_level not in LOG_LEVELS:
            raise ValueError(f"--uvicorn-log-level: must be one of {', '.join(LOG_LEVELS)}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser (supported: hermes)")
        if self.tool_call_parser not in (None, "hermes"):
            raise ValueError(f"--tool-call-parser: {self.tool_call_parser!r} is not supported (supported: hermes)")

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


def _add(parser: argparse.ArgumentParser, name: str, *aliases: str, **kwargs) -> None:
    """Register --a-b and --a_b (plus aliases) for one destination."""
    spellings = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    parser.add_argument(*spellings, *aliases, dest=name.replace("-", "_"), **kwargs)


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    _add(parser, "model", default=UNSET, help="model directory or hub id (same as the positional MODEL)")
    _add(parser, "dtype", default=UNSET, help="auto, float32, bfloat16, float16")
    _add(parser, "max-model-len", type=int, default=UNSET)
    _add(parser, "gpu-memory-utilization", type=float, default=UNSET)
    _add(parser, "max-num-seqs", type=int, default=UNSET)
    _add(parser, "max-num-batched-tokens", type=int, default=UNSET)
    _add(parser, "block-size", type=int, default=UNSET)
    _add(parser, "limit-mm-per-prompt", default=UNSET, help="image=5,video=1 or JSON {\"image\": 5}")
    _add(parser, "enable-prefix-caching", action=argparse.BooleanOptionalAction, default=UNSET)
    _add(parser, "mm-processor-kwargs", default=UNSET, help="JSON, e.g. {\"max_pixels\": 1003520}")
    _add(parser, "encoder-cache-size", type=int, default=UNSET,
         help="vision-embedding rows the encoder cache holds (default: max of --max-num-batched-tokens "
              "and --max-model-len, so any prompt's media fit)")
    _add(parser, "seed", type=int, default=UNSET)
    _add(parser, "enforce-eager", action="store_true", default=UNSET)
    _add(parser, "deterministic", action=argparse.BooleanOptionalAction, default=UNSET,
         help="batch-invariant numerics: a request's tokens do not depend on what else is in the batch "
              "(default on; --no-deterministic trades it for a few percent of throughput on the GPU)")
    _add(parser, "trust-remote-code", action="store_true", default=UNSET)
    _add(parser, "tensor-parallel-size", "-tp", type=int, default=UNSET)
    _add(parser, "pipeline-parallel-size", "-pp", type=int, default=UNSET)
    _add(parser, "distributed-executor-backend", default=UNSET, choices=("mp", "ray", "uni"),
         help="mp (a process per rank, one host), ray (Ray actors, several hosts) or uni (one rank)")
    _add(parser, "mm-encoder-tp-mode", default=UNSET, help="data (the vision tower replicated, images split "
         "across the TP ranks); weights is not supported")
    _add(parser, "cpu-offload-gb", type=float, default=UNSET)
    _add(parser, "kv-cache-dtype", default=UNSET)
    _add(parser, "quantization", "-q", default=UNSET)
    _add(parser, "device", default=UNSET, help="auto, cpu or cuda")
    _add(parser, "num-gpu-blocks-override", type=int, default=UNSET)
    _add(parser, "load-format", default=UNSET, help="auto, safetensors or dummy")


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    _add(parser, "host", default="0.0.0.0")
    _add(parser, "port", type=int, default=8000)
    _add(parser, "served-model-name", nargs="+", default=None)
    _add(parser, "api-key", nargs="+", default=None, help="or VLSERVE_API_KEY / VLLM_API_KEY")
    _add(parser, "chat-template", default=None, help="file, bundled name (qwen2_vl, ...) or inline Jinja")
    _add(parser, "trust-request-chat-template", action="store_true")
    _add(parser, "enable-auto-tool-choice", action="store_true")
    _add(parser, "tool-call-parser", default=None, help="hermes")
    _add(parser, "allowed-local-media-path", default=None)
    _add(parser, "allowed-media-domains", nargs="+", default=None)
    _add(parser, "disable-log-requests", action="store_true")
    _add(parser, "disable-log-stats", action="store_true")
    _add(parser, "uvicorn-log-level", default="info")
    _add(parser, "max-log-len", type=int, default=None)


# (flag, ServerConfig field, type, environment variable): the hardening limits. The environment
# variable, when set, replaces the built-in default; the flag wins over both.
LIMIT_FLAGS = (
    ("media-fetch-connect-timeout", "media_fetch_connect_timeout_s", float, "VLSERVE_MEDIA_FETCH_CONNECT_TIMEOUT"),
    ("media-fetch-timeout", "media_fetch_timeout_s", float, "VLSERVE_MEDIA_FETCH_TIMEOUT"),
    ("max-media-bytes", "max_media_bytes", int, "VLSERVE_MAX_MEDIA_BYTES"),
    ("max-concurrent-media-fetches", "max_concurrent_media_fetches", int, "VLSERVE_MAX_CONCURRENT_MEDIA_FETCHES"),
    ("max-media-redirects", "max_media_redirects", int, "VLSERVE_MAX_MEDIA_REDIRECTS"),
    ("max-image-pixels", "max_image_pixels", int, "VLSERVE_MAX_IMAGE_PIXELS"),
    ("max-video-frame-pixels", "max_video_frame_pixels", int, "VLSERVE_MAX_VIDEO_FRAME_PIXELS"),
    ("max-video-duration", "max_video_duration_s", float, "VLSERVE_MAX_VIDEO_DURATION"),
    ("max-video-decoded-frames", "max_video_decoded_frames", int, "VLSERVE_MAX_VIDEO_DECODED_FRAMES"),
    ("video-decode-timeout", "video_decode_timeout_s", float, "VLSERVE_VIDEO_DECODE_TIMEOUT"),
    ("max-waiting-requests", "max_waiting_requests", int, "VLSERVE_MAX_WAITING_REQUESTS"),
    ("max-queued-media-bytes", "max_queued_media_bytes", int, "VLSERVE_MAX_QUEUED_MEDIA_BYTES"),
    ("request-timeout", "request_timeout_s", float, "VLSERVE_REQUEST_TIMEOUT"),
    ("engine-iteration-timeout", "engine_iteration_timeout_s", float, "VLSERVE_ENGINE_ITERATION_TIMEOUT"),
    ("max-n", "max_n", int, "VLSERVE_MAX_N"),
    ("max-beam-width", "max_beam_width", int, "VLSERVE_MAX_BEAM_WIDTH"),
    ("max-best-of", "max_best_of", int, "VLSERVE_MAX_BEST_OF"),
    ("max-request-body-bytes", "request_max_body_size", int, "VLSERVE_MAX_REQUEST_BODY_BYTES"),
    ("h11-max-incomplete-event-size", "h11_max_incomplete_event_size", int, "VLSERVE_H11_MAX_INCOMPLETE_EVENT_SIZE"),
    ("drain-timeout", "drain_timeout_s", float, "VLSERVE_DRAIN_TIMEOUT"),
)


def _env_default(flag: str, field_name: str, kind: type, env_name: str):
    text = os.environ.get(env_name)
    if text is None or not text.strip():
        return ServerConfig.__dataclass_fields__[field_name].default
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{env_name} (--{flag}): expected a number, got {text!r}") from None


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    for flag, field_name, kind, env_name in LIMIT_FLAGS:
        _add(parser, flag, type=kind, default=None, help=f"or {env_name}; default "
             f"{ServerConfig.__dataclass_fields__[field_name].default}")
    _add(parser, "allow-private-media-addresses", action="store_true",
         help="let media URLs reach loopback/private/link-local addresses (off: refused)")
    _add(parser, "keep-serving-on-engine-death", action="store_true",
         help="stay up (answering 503) when the engine dies, instead of exiting with status 1")


def limit_values_from(args: argparse.Namespace) -> dict:
    values = {}
    for flag, field_name, kind, env_name in LIMIT_FLAGS:
        given = getattr(args, flag.replace("-", "_"))
        values[field_name] = given if given is not None else _env_default(flag, field_name, kind, env_name)
    return values


def build_serve_parser(prog: str = "vlserve serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                     description="Serve a model over an OpenAI-compatible HTTP API.")
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL")
    _add_engine_flags(parser)
    _add_server_flags(parser)
    _add_limit_flags(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlserve", allow_abbrev=False,
                                     description="Serve vision-language models with an OpenAI-compatible API.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible); see `vlserve serve --help`",
                   add_help=False)
    return parser


def _parse_json(flag: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--{flag}: invalid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(value, dict):
        raise ValueError(f"--{flag}: expected a JSON object, got {type(value).__name__}")
    return value


def parse_limit_mm_per_prompt(text: str) -> dict:
    """'image=5,video=1' or JSON ('{"image": 5}' or vLLM's '{"image": {"count": 5, ...}}')."""
    if text.strip().startswith("{"):
        return _parse_json("limit-mm-per-prompt", text)
    limits: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        modality, sep, count = item.partition("=")
        if not sep or not count.strip().lstrip("-").isdigit():
            raise ValueError(f"--limit-mm-per-prompt: expected modality=count, got {item!r}")
        limits[modality.strip()] = int(count)
    return limits


def _check_supported(args: argparse.Namespace) -> None:
    unsupported = [
        (args.quantization not in (None, "None", "none"), "quantization",
         f"{args.quantization!r}: quantized checkpoints are not supported"),
        (args.kv_cache_dtype not in (None, "auto"), "kv-cache-dtype",
         f"{args.kv_cache_dtype!r}: not supported (only auto, the model dtype)"),
        (args.cpu_offload_gb not in (None, 0), "cpu-offload-gb",
         f"{args.cpu_offload_gb}: weight offloading is not supported"),
        (args.device not in (None, "auto", "cpu", "cuda"), "device", f"{args.device!r}: use auto, cpu or cuda"),
        (args.dtype not in (None, "auto", "float32", "float", "bfloat16", "float16", "half"), "dtype",
         f"{args.dtype!r}: use auto, float32, bfloat16 or float16"),
        (args.load_format not in (None, "auto", "safetensors", "dummy"), "load-format",
         f"{args.load_format!r}: not supported (auto, safetensors, dummy)"),
    ]
    for bad, flag, message in unsupported:
        if bad:
            raise ValueError(f"--{flag} {message}")


ENGINE_FLAGS = ("dtype", "max_model_len", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens",
                "block_size", "enable_prefix_caching", "seed", "enforce_eager", "trust_remote_code",
                "tensor_parallel_size", "pipeline_parallel_size", "cpu_offload_gb", "kv_cache_dtype",
                "device", "num_gpu_blocks_override", "load_format", "distributed_executor_backend", "encoder_cache_size",
                "deterministic",
                "mm_encoder_tp_mode")


def engine_kwargs_from(args: argparse.Namespace, model: str) -> dict:
    _check_supported(args)
    kwargs = {name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name) is not None}
    kwargs["model"] = model
    if args.limit_mm_per_prompt is not None:
        kwargs["limit_mm_per_prompt"] = parse_limit_mm_per_prompt(args.limit_mm_per_prompt)
    if args.mm_processor_kwargs is not None:
        kwargs["mm_processor_kwargs"] = _parse_json("mm-processor-kwargs", args.mm_processor_kwargs)
    return kwargs


def server_config_from(args: argparse.Namespace, model: str, engine_kwargs: dict) -> ServerConfig:
    env_key = os.environ.get("VLSERVE_API_KEY") or os.environ.get("VLLM_API_KEY")
    api_keys = tuple(args.api_key or ([env_key] if env_key else []))
    return ServerConfig(
        model=model, host=args.host, port=args.port,
        served_model_names=tuple(args.served_model_name or ()), api_keys=api_keys,
        chat_template=resolve_chat_template(args.chat_template) if args.chat_template else None,
        trust_request_chat_template=args.trust_request_chat_template,
        enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
        limits=MultiModalLimits.parse(engine_kwargs.get("limit_mm_per_prompt")),
        allowed_local_media_path=args.allowed_local_media_path,
        allowed_media_domains=tuple(args.allowed_media_domains) if args.allowed_media_domains else None,
        disable_log_requests=args.disable_log_requests, disable_log_stats=args.disable_log_stats,
        uvicorn_log_level=args.uvicorn_log_level.lower(), max_log_len=args.max_log_len,
        allow_private_media_addresses=args.allow_private_media_addresses,
        exit_on_engine_death=not args.keep_serving_on_engine_death, **limit_values_from(args),
    )


def _known_options(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings]


def parse_serve_args(argv: list[str], prog: str = "vlserve serve") -> tuple[dict, ServerConfig]:
    """argv (after `serve`) -> (engine kwargs, ServerConfig). ValueError on a bad or unsupported value."""
    parser = build_serve_parser(prog)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=", 1)[0]
        close = difflib.get_close_matches(flag, _known_options(parser), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unrecognized argument {flag!r}{hint}")
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"MODEL {args.model_tag!r} and --model {args.model!r} disagree")
    model = args.model_tag or args.model
    if not model:
        raise ValueError("a model is required: vlserve serve MODEL (or --model MODEL)")
    engine_kwargs = engine_kwargs_from(args, model)
    return engine_kwargs, server_config_from(args, model, engine_kwargs)


def run_serve(argv: list[str], prog: str) -> int:
    try:
        engine_kwargs, server_config = parse_serve_args(argv, prog)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    from app.server import serve

    return serve(engine_kwargs, server_config)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        if any(arg in ("-h", "--help") for arg in argv[1:]):
            build_serve_parser().print_help()
            return 0
        return run_serve(argv[1:], "vlserve serve")
    build_parser().parse_args(argv)  # --help, or an error naming the valid commands
    build_parser().print_help()
    return 0


def module_main(argv: list[str] | None = None) -> int:
    """`python -m app --model MODEL [flags]`: the serve flags without the subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        build_serve_parser("python -m app").print_help()
        return 0
    return run_serve(argv, "python -m app")


if __name__ == "__main__":
    sys.exit(main())
