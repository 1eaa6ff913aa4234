"""`vlserve serve MODEL [flags]` / `python -m app --model MODEL [flags]`: vLLM's flag names ->
(engine kwargs for `create_engine_config`, ServerConfig). Parsing only; `main` then hands both to
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

from app.chat_templates import resolve_chat_template
from app.listen import bind_listener
from app.server_config import ServerConfig
from app.version import package_version
from vision.limits import MultiModalLimits, decode_limit_flag

UNSET = None  # argparse default for engine flags: "not given" -> left out of the engine kwargs


_SIZE_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
                  "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def human_readable_int(text: str) -> int:
    """vLLM's sizes: 1500, 25.6k (decimal: k m g t) or 2G (binary: K M G T)."""
    value = text.strip()
    try:
        if value[-1:] in _SIZE_SUFFIXES:
            return int(float(value[:-1]) * _SIZE_SUFFIXES[value[-1]])
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2000000000, 2G, 500M, 1.5g)") from None


def _add(parser: argparse.ArgumentParser, name: str, *aliases: str, **kwargs) -> None:
    """Register --a-b and --a_b (plus aliases) for one destination."""
    spellings = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    parser.add_argument(*spellings, *aliases, dest=name.replace("-", "_"), **kwargs)


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    _add(parser, "model", default=UNSET, help="model directory or hub id (same as the positional MODEL)")
    _add(parser, "dtype", default=UNSET, help="auto, float32, bfloat16, float16")
    _add(parser, "max-model-len", type=int, default=UNSET)
    _add(parser, "gpu-memory-utilization", type=float, default=UNSET, help="GPU only; see --kv-cache-memory-bytes")
    _add(parser, "kv-cache-memory-bytes", type=human_readable_int, default=UNSET,
         help="KV cache size, e.g. 2G or 500M (default on the CPU: --max-num-seqs requests of --max-model-len, "
              "capped at half the available memory)")
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
    _add(parser, "mixed-graph-max-tokens", type=int, default=UNSET,
         help="steps with prompt rows up to this many tokens replay CUDA graphs (default 1024; 0: eager; "
              "a vlserve flag: vLLM gets the same from torch.compile's piecewise graphs)")
    _add(parser, "async-scheduling", action=argparse.BooleanOptionalAction, default=UNSET,
         help="schedule step N+1 while step N runs on the GPU (default on for one CUDA rank)")
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
    _add(parser, "tokenizer", default=UNSET, help="tokenizer directory or hub id (default: the model's)")
    _add(parser, "revision", default=UNSET, help="hub revision (branch, tag or commit) of the model")
    _add(parser, "tokenizer-revision", default=UNSET, help="hub revision of the tokenizer (default: --revision)")
    _add(parser, "download-dir", default=UNSET, help="folder to download hub checkpoints into (default: HF cache)")
    _add(parser, "max-logprobs", type=int, default=UNSET,
         help="most logprobs / top_logprobs a request may ask for (default 20; -1: the vocabulary size)")
    _add(parser, "enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=UNSET,
         help="split long prompts across steps (default on); off: a prompt is prefilled in one step, "
              "so --max-num-batched-tokens must hold --max-model-len")
    _add(parser, "generation-config", default=UNSET,
         help="auto (the model's generation_config.json gives unset sampling fields their defaults), "
              "vllm (vLLM's neutral defaults) or a folder holding a generation_config.json")
    _add(parser, "override-generation-config", default=UNSET,
         help='JSON on top of the generation config, e.g. {"temperature": 0.5}')
    _add(parser, "hf-overrides", default=UNSET, help='JSON set on the HF config, e.g. {"rope_theta": 20000}')
    _add(parser, "media-io-kwargs", default=UNSET, help='JSON media loading settings: {"video": {"num_frames": 8}}')
    _add(parser, "mm-processor-cache-gb", type=float, default=UNSET,
         help="accepted for vLLM compatibility; no effect (there is no processor-output cache here)")
    _add(parser, "structured-outputs-config", default=UNSET,
         help='JSON, e.g. {"backend": "auto|guidance|xgrammar", "disable_any_whitespace": false, '
              '"disable_additional_properties": false}')


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
    _add(parser, "media-decode-workers", type=int, default=None,
         help="processes that decode images off the event loop (default: a quarter of the cores, 1 to 8; "
              "0: threads of the API process)")
    _add(parser, "ssl-keyfile", default=None, help="TLS private key (PEM); with --ssl-certfile serves HTTPS")
    _add(parser, "ssl-certfile", default=None, help="TLS certificate chain (PEM)")
    _add(parser, "ssl-ca-certs", default=None, help="CA certificates to verify client certificates")
    _add(parser, "allowed-origins", default='["*"]', help='CORS: JSON list of allowed origins (default ["*"])')
    _add(parser, "allowed-methods", default='["*"]', help="CORS: JSON list of allowed methods")
    _add(parser, "allowed-headers", default='["*"]', help="CORS: JSON list of allowed headers")
    _add(parser, "allow-credentials", action="store_true", help="CORS: allow credentials")
    _add(parser, "root-path", default=None, help="path prefix the server is reached under behind a proxy")
    _add(parser, "response-role", default="assistant", help="role of chat replies to a generation prompt")
    _add(parser, "chat-template-content-format", default="auto",
         help="string (content as text), openai (content as a list of parts) or auto (from the template)")
    _add(parser, "config", default=None, help="YAML file of flags (vLLM's form: `max-model-len: 4096`); "
         "flags on the command line win")


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
    parser.add_argument("--version", action="version", version=package_version())
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible); see `vlserve serve --help`",
                   add_help=False)
    sub.add_parser("bench", help="`vlserve bench serve`: load a running server, print vLLM's result block",
                   add_help=False)
    return parser


def _parse_json(flag: str, text: str | dict | list, kind: type = dict):
    """A JSON flag's value; from a --config YAML file it may already be parsed."""
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as exc:
        raise ValueError(f"--{flag}: invalid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(value, kind):
        expected = "object" if kind is dict else "list"
        raise ValueError(f"--{flag}: expected a JSON {expected}, got {type(value).__name__}")
    return value


def _json_strings(flag: str, text: str | list) -> tuple[str, ...]:
    values = _parse_json(flag, text, list)
    if not all(isinstance(value, str) for value in values):
        raise ValueError(f"--{flag}: expected a JSON list of strings, got {values!r}")
    return tuple(values)


def parse_limit_mm_per_prompt(text: str | dict) -> dict:
    """'image=5,video=1' or JSON ('{"image": 5}' or vLLM's '{"image": {"count": 5, ...}}') -> the
    engine keyword's object, counts as integers; ValueError (naming the flag) when invalid."""
    limits = MultiModalLimits.parse(text)
    decoded = decode_limit_flag(text)
    return {modality: spec if isinstance(spec, dict) else limits.max_items(modality)
            for modality, spec in decoded.items()}


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
                "device", "num_gpu_blocks_override", "load_format", "distributed_executor_backend",
                "encoder_cache_size",
                "deterministic", "async_scheduling", "kv_cache_memory_bytes", "mixed_graph_max_tokens",
                "mm_encoder_tp_mode",
                "tokenizer", "revision", "tokenizer_revision", "download_dir", "max_logprobs", "enable_chunked_prefill",
                "generation_config", "mm_processor_cache_gb")
# Engine flags whose value is a JSON object.
JSON_ENGINE_FLAGS = ("mm_processor_kwargs", "override_generation_config", "hf_overrides", "media_io_kwargs",
                     "structured_outputs_config")


def engine_kwargs_from(args: argparse.Namespace, model: str) -> dict:
    _check_supported(args)
    kwargs = {name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name) is not None}
    kwargs["model"] = model
    if args.limit_mm_per_prompt is not None:
        kwargs["limit_mm_per_prompt"] = parse_limit_mm_per_prompt(args.limit_mm_per_prompt)
    for name in JSON_ENGINE_FLAGS:
        if getattr(args, name) is not None:
            kwargs[name] = _parse_json(name.replace("_", "-"), getattr(args, name))
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
        media_decode_workers=args.media_decode_workers,
        ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
        allowed_origins=_json_strings("allowed-origins", args.allowed_origins),
        allowed_methods=_json_strings("allowed-methods", args.allowed_methods),
        allowed_headers=_json_strings("allowed-headers", args.allowed_headers),
        allow_credentials=args.allow_credentials, root_path=args.root_path, response_role=args.response_role,
        chat_template_content_format=args.chat_template_content_format,
    )


def _known_options(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings]


def _suggestion(flag: str, parser: argparse.ArgumentParser) -> str:
    close = difflib.get_close_matches(flag.split("=", 1)[0], _known_options(parser), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def config_file_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """--config FILE: vLLM's YAML form, one flag per key (`max-model-len: 4096`, `enforce-eager:
    true`, lists for multi-value flags, objects or JSON text for JSON flags) -> argparse defaults."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--config: cannot read {path}: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config: {path} must hold a mapping of flag names to values")
    actions = {option: action for action in parser._actions for option in action.option_strings}
    defaults = {}
    for key, value in values.items():
        action = actions.get(f"--{key}")
        if action is None or key == "config":
            raise ValueError(f"--config: unknown flag {key!r} in {path}{_suggestion(f'--{key}', parser)}")
        if action.nargs == "+" and not isinstance(value, list):
            value = [value]
        elif callable(action.type) and isinstance(value, str):
            value = action.type(value)
        defaults[action.dest] = value
    return defaults


def parse_serve_args(argv: list[str], prog: str = "vlserve serve") -> tuple[dict, ServerConfig]:
    """argv (after `serve`) -> (engine kwargs, ServerConfig). ValueError on a bad or unsupported value."""
    parser = build_serve_parser(prog)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ValueError(f"unrecognized argument {unknown[0].split('=', 1)[0]!r}{_suggestion(unknown[0], parser)}")
    if args.config is not None:  # the file's values become defaults: the command line still wins
        parser.set_defaults(**config_file_defaults(args.config, parser))
        args = parser.parse_args(argv)
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"MODEL {args.model_tag!r} and --model {args.model!r} disagree")
    model = args.model_tag or args.model
    if not model:
        raise ValueError("a model is required: vlserve serve MODEL (or --model MODEL)")
    engine_kwargs = engine_kwargs_from(args, model)
    return engine_kwargs, server_config_from(args, model, engine_kwargs)


def run_serve(argv: list[str], prog: str) -> int:
    try:
        address, _ = build_serve_parser(prog).parse_known_args(argv)
        listener = bind_listener(address.host, address.port)  # first: a busy port fails before torch loads
        engine_kwargs, server_config = parse_serve_args(argv, prog)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    from app.server import serve

    return serve(engine_kwargs, server_config, listener)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        if any(arg in ("-h", "--help") for arg in argv[1:]):
            build_serve_parser().print_help()
            return 0
        return run_serve(argv[1:], "vlserve serve")
    if argv[:2] == ["bench", "serve"]:
        from app.benchmark.serve import main as bench_serve_main

        return bench_serve_main(argv[2:])
    if argv[:1] == ["bench"]:
        print("usage: vlserve bench serve [flags]  (see `vlserve bench serve --help`)", file=sys.stderr)
        return 2
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
