"""cli: the `moe-prune` command, on top of everything. parser.py builds the argparse parser and runs one command:
errors a user can cause (moe_prune.errors) print one line and exit with status 2. commands.py: one function per
subcommand, which parses its arguments into one library call and prints the result. defaults.py: the defaults the
parser shows without importing torch (tests check they equal the library's).

May import: every subpackage, inside the command functions only, so that `moe-prune serve` and `--help` import
no torch.
"""

from .parser import build_parser, main

__all__ = ["build_parser", "main"]
