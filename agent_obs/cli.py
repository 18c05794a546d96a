"""The ``agent-obs`` command line."""

from __future__ import annotations

import argparse
import sys

from agent_obs import launch, report, resources


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-obs",
        description="Token-class metrics (entropy, perplexity, top-k mass, accuracy) for agent SFT.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    report.register(subparsers)
    launch.register(subparsers)
    resources.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
