"""Reconstruction sanity check for any VAE on any data source.

    python experiments/reconstruct.py                                   # embedded VAE, bundled test digits
    python experiments/reconstruct.py --vae stabilityai/sd-vae-ft-ema   # a Hub VAE (needs it locally offline)
    python experiments/reconstruct.py --vae path/to/vae --data source=npz --data path=images.npz

Prints PSNR, SSIM and the mean/std of the scaled latents, and writes an original /
reconstruction / |difference| figure (plus its numbers as JSON beside it). The same as
``python main.py reconstruct``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["reconstruct", *sys.argv[1:]]))
