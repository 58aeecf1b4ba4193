"""The ``fadrm`` command's first step: load the CLI (and with it PyTorch), then run it.

Loading takes seconds. A Ctrl-C meanwhile ends the command with one line and exit 130 instead of a
traceback from inside an import; from then on :func:`fadrm.cli.main` handles every signal.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fadrm`` with ``argv`` (default: the command line); returns the exit status."""
    try:
        from .cli import main as run_command
    except KeyboardInterrupt:
        print("fadrm: interrupted while starting; nothing was written", file=sys.stderr, flush=True)
        if argv is None:
            # The interrupt may have crossed code the libraries run through the C API, which marks it as
            # unhandled, and the interpreter would then end by SIGINT on its way out: end here, with the
            # status said (nothing is open or written yet).
            os._exit(130)
        return 130
    return run_command(argv)
