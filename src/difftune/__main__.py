"""`python -m difftune` (and `accelerate launch -m difftune train ...`)."""

import sys

from .cli import main

sys.exit(main())
