"""The ``zipasr`` command: every Snakemake rule calls one of its subcommands and nothing else.

Each stage module has a light ``register(subparsers)`` (argparse only) whose handler imports the
heavy libraries lazily, so ``zipasr --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from zipasr.errors import ZipasrError
from zipasr.log import setup_logging

# Modules that contribute subcommands, in the order of the DAG.
COMMAND_MODULES = (
    "zipasr.data.synth.cli",
    "zipasr.data.cli",
    "zipasr.lang.cli",
    "zipasr.train.cli",
    "zipasr.lm.cli",
    "zipasr.decode.cli",
    "zipasr.model.cli",
    "zipasr.deploy.cli",
    "zipasr.track.cli",
    "zipasr.track.plots",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zipasr", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        rc = args.func(args)
    except ZipasrError as e:
        logging.getLogger("zipasr").error("%s", e)
        print(f"zipasr {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
