"""`python -m moe_prune.cli`: the same as the `moe-prune` command."""

import sys

from .parser import main

sys.exit(main())
