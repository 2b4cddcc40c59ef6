"""``python main.py reconstruct`` (also ``experiments/reconstruct.py``): does a VAE embed
these images faithfully? PSNR, SSIM, the scaled latents' statistics and a figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

from ..config import DataConfig
from ..files import check_output, write_text_atomic
from . import data_section, new_output_dir, say

__all__ = ["main", "reconstruction_check"]


def reconstruction_check(
    vae_name: str = "embedded",
    subfolder: Optional[str] = None,
    data: Optional[Dict[str, object]] = None,
    num_images: int = 500,
    out: Optional[Path] = None,
    overwrite: bool = False,
) -> Dict:
    """Load a VAE and reconstruct the data described by ``data`` (keys of the ``data:``
    section; default the bundled test digits); write the figure and its numbers as JSON
    beside it (default ``runs/reconstruct-<time>/``)."""
    from ..reconstruction import reconstruct
    from ..vae import FrozenVAE

    if out is not None:
        check_output(Path(out), overwrite)
    data_cfg = data_section(DataConfig(split="test"), (data or {}).items())
    vae = FrozenVAE.from_pretrained(vae_name, subfolder)
    figure = Path(out) if out else new_output_dir("reconstruct", None) / "reconstruction.png"
    metrics = reconstruct(vae, data_cfg, figure, num_images=num_images)
    write_text_atomic(
        figure.with_suffix(".json"),
        json.dumps({"vae": vae_name, "data": vars(data_cfg), **metrics}, indent=2),
        "reconstruction report",
    )
    metrics["summary"] = (
        f"VAE {vae_name}: PSNR {metrics['psnr']:.2f} dB (pooled {metrics['psnr_pooled']:.2f} dB), "
        f"SSIM {metrics['ssim']:.4f} on {metrics['num_images']} images"
        + (f" ({metrics['skipped_files']} bad files skipped)" if metrics["skipped_files"] else "")
        + "; scaled latents "
        f"{tuple(metrics['latent_shape'])} mean {metrics['latent_mean']:+.3f} std {metrics['latent_std']:.3f}; "
        f"figure {figure}"
    )
    return metrics


def main(args) -> None:
    say(
        reconstruction_check(args.vae, args.subfolder, dict(args.data), args.num_images, args.out, args.overwrite)[
            "summary"
        ]
    )
