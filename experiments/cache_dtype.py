"""What storing the latent cache in bf16 or fp16 (`vae.cache_dtype`) costs: the rounding error
of the cached posterior moments against a float32 cache of the same data.

    python experiments/cache_dtype.py [--set data.max_items=1000 ...]

Encodes the experiment's training data (default: the 4 500 bundled digits through the shipped
VAE) three times into a temporary directory and prints, per storage dtype, the largest and
the mean relative error of the means and stds, and the largest error of a drawn latent in
model units (scaled latents have unit variance, so this compares directly with the noise).
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from latentflow.config import load_config
from latentflow.data import build_dataset
from latentflow.distributed import make_accelerator
from latentflow.latents import load_or_build_cache
from latentflow.vae import FrozenVAE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="experiment file (default: the embedded default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args()
    acc = make_accelerator("no", True)
    moments = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16", "float16"):
            cfg = load_config(args.config, [*args.set, f"vae.cache_dtype={dtype}"])
            vae = FrozenVAE.from_pretrained(cfg.vae.pretrained, cfg.vae.subfolder)
            cache, _ = load_or_build_cache(
                vae, build_dataset(cfg.data, vae.in_channels), Path(tmp), acc, cfg.data, cfg.vae
            )
            moments[dtype] = cache.moments(torch.arange(len(cache)))  # (N, 2, c, h, w) float32
    ref = moments["float32"]
    eps = torch.randn(ref[:, 1].shape, generator=torch.Generator().manual_seed(0))
    z_ref = vae.scale(ref[:, 0] + ref[:, 1] * eps)
    print(f"{len(ref)} items, latents {tuple(ref.shape[2:])}")
    print("| cache_dtype | size | mean: max / mean rel. error | std: max / mean rel. error | max abs. error of z |")
    print("|---|---|---|---|---|")
    for dtype, m in moments.items():
        rel = (m - ref).abs() / ref.abs().clamp_min(1e-30)
        z = vae.scale(m[:, 0] + m[:, 1] * eps)
        size = {"float32": "1", "bfloat16": "1/2", "float16": "1/2"}[dtype]
        print(
            f"| {dtype} | {size} | {rel[:, 0].max():.2e} / {rel[:, 0].mean():.2e} | "
            f"{rel[:, 1].max():.2e} / {rel[:, 1].mean():.2e} | {(z - z_ref).abs().max():.2e} |"
        )


if __name__ == "__main__":
    main()
