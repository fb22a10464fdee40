"""`python -m orestudy COMMAND ...`: the same as the `orestudy` console script."""
import sys

from .commands.cli import main

sys.exit(main())
