"""``python -m fadrm`` (and ``torchrun -m fadrm``) runs the CLI."""

from .cli import main

raise SystemExit(main())
