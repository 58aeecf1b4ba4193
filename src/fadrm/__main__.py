"""``python -m fadrm`` (and ``torchrun -m fadrm``) runs the CLI."""

from .command import main

raise SystemExit(main())
