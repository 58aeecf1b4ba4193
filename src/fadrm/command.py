"""The ``fadrm`` command's first step: load the CLI (and with it PyTorch), then run it.

Loading takes seconds. A Ctrl-C meanwhile ends the command with one line and exit 130 instead of a
traceback from inside an import; from then on :func:`fadrm.cli.main` handles every signal.
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fadrm`` with ``argv`` (default: the command line); returns the exit status."""
    try:
        from .cli import main as run_command
    except KeyboardInterrupt:
        print("fadrm: interrupted while starting; nothing was written", file=sys.stderr)
        return 130
    return run_command(argv)
