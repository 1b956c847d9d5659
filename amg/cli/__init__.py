"""The `amg` command: data, train, eval, prune, flops, report, select, gate, baseline, import, study."""

from __future__ import annotations

import os
import sys
from typing import Sequence

from amg.cli.parser import build_parser
from amg.errors import InputError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # as a shell reports a command stopped by Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gate"]:  # the gate owns its options (argparse cannot hand "--help" through)
        from amg.reporting.gate_cli import main as gate_main

        return gate_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (InputError, OSError) as error:
        # Bad input (and missing or unwritable files) is the user's to fix: say what, without a
        # traceback. Anything else is a bug or a failure inside a library: its traceback stays.
        _say(f"amg {args.command}: error: {error}")
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C (or a study's SIGTERM): what was finished is kept, the rest said
        _say(f"amg {args.command}: interrupted")
        return EXIT_INTERRUPTED


def _say(message: str) -> None:
    """To stderr, once: under torchrun the processes fail alike, and rank 0 speaks for them
    (torch-free: `amg report` must not load torch to print an error)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)
