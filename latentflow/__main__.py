"""``python -m latentflow ...`` is ``python main.py ...`` (and what ``main.py launch`` starts)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
