"""`vlserve` command line: vLLM's flag names -> (EngineConfig, ServerConfig). Parsing only."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlserve", description="Serve vision-language models with an OpenAI-compatible API.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 0
    print("vlserve serve: not yet (the server lands with issue 6)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
