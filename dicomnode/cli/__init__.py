"""The ``dicomnode`` command.

Each sub-command lives in its own module under ``dicomnode.cli`` and exposes ``register(subparsers)``;
modules are imported lazily so ``dicomnode echo`` never pays for torch. Engines, schedulers and AEs are
created here (in the sub-command modules), then passed in.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from dicomnode import __version__

#: sub-command name -> module that implements it (module has ``register`` and the handler).
COMMANDS: dict[str, str] = {
    "analyze": "dicomnode.cli.analyze",
    "phantom": "dicomnode.cli.phantom",
    "demo": "dicomnode.cli.demo",
    "serve": "dicomnode.cli.node",
    "receive": "dicomnode.cli.node",
    "work": "dicomnode.cli.node",
    "echo": "dicomnode.cli.node",
    "check-config": "dicomnode.cli.admin",
    "db": "dicomnode.cli.admin",
    "rules": "dicomnode.cli.admin",
    "user": "dicomnode.cli.user",
    "evaluate": "dicomnode.cli.ml",
    "train": "dicomnode.cli.ml",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    description = __doc__.splitlines()[0] if __doc__ else None
    parser = argparse.ArgumentParser(prog="dicomnode", description=description)
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen: set[str] = set()
    for name, modname in COMMANDS.items():
        if only is not None and name != only:
            continue
        if modname in seen:
            continue
        mod = importlib.import_module(modname)
        seen.add(modname)
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(args_list)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        rc: int = handler(args)
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
