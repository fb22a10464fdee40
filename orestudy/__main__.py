"""`python -m orestudy COMMAND ...`: the same as the `orestudy` console script."""
import sys

from .cli import main

sys.exit(main())
