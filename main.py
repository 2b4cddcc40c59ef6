"""latentflow entry point: ``python main.py [train|train-vae|reconstruct|sample] ...``.

Also runs under ``accelerate launch main.py ...``. See README.md.
"""

import sys

from latentflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
