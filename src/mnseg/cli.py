"""The ``mnseg`` command: one entry point, one subcommand per job.

Each subcommand lives in ``mnseg.commands.<name>`` and provides ``HELP``
(one line), ``add_arguments(parser)`` and ``run(args) -> int``. Command modules
keep heavy imports inside ``run`` so ``mnseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mnseg import __version__
from mnseg.errors import MnsegError

COMMANDS = [
    "check", "convert", "synth", "pretrain", "train", "predict", "evaluate", "export", "convert-checkpoint", "demo",
    "benchmark",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnseg",
        description="Semi-supervised 3D medical image segmentation: train, predict and score from a dataset folder.",
    )
    parser.add_argument("--version", action="version", version=f"mnseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module_name = f"mnseg.commands.{name.replace('-', '_')}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # command not built yet
            raise
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key.sub=value overrides may come anywhere on the line (after options too)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except MnsegError as exc:
        print(f"mnseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mnseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
