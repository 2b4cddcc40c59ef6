"""Train the small MNIST ``AutoencoderKL`` that ships in ``latentflow/assets/mnist-vae``.

``python main.py train-vae --out DIR`` trains a diffusers AutoencoderKL with an MSE + KL
objective on the bundled digits (train split), measures held-out PSNR/SSIM on the test
split, stores per-channel latent statistics in the config (``latents_mean``/``latents_std``, with
``scaling_factor`` 1) so that each scaled channel has zero mean and unit variance, and
writes it with ``save_pretrained``. The result then loads like any Hub VAE.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from .config import DataConfig
from .data import build_dataset
from .errors import LatentflowError
from .metrics import reconstruction_metrics
from .runtime import atomic_dir, check_output

__all__ = ["VAETrainArgs", "build_autoencoder", "train_vae"]


@dataclass
class VAETrainArgs:
    out: str = "runs/mnist-vae"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-6
    block_out_channels: Tuple[int, ...] = (16, 32, 64)  # 3 levels: 32 px -> 8 px
    latent_channels: int = 4
    image_size: int = 32
    max_items: Optional[int] = None
    seed: int = 0
    overwrite: bool = False
    replace_shipped: bool = False  # only the maintainer command regenerates latentflow/assets


def build_autoencoder(
    in_channels: int = 1,
    block_out_channels: Tuple[int, ...] = (16, 32, 64),
    latent_channels: int = 4,
    sample_size: int = 32,
):
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(32, min(block_out_channels)),
        sample_size=sample_size,
    )


@torch.no_grad()
def _evaluate(vae, loader, device) -> Tuple[dict, torch.Tensor]:
    """Held-out reconstruction metrics (posterior mean, as at sampling time) and latents."""
    vae.eval()
    originals, recons, latents = [], [], []
    for x, _, _ in loader:
        x = x.to(device)
        posterior = vae.encode(x).latent_dist
        recons.append(vae.decode(posterior.mean).sample.clamp(-1, 1).cpu())
        originals.append(x.cpu())
        latents.append(posterior.sample().cpu())
    vae.train()
    return reconstruction_metrics(torch.cat(recons), torch.cat(originals)), torch.cat(latents)


def normalize_latents(vae, train_set) -> Tuple[List[float], List[float]]:
    """Store per-channel latent statistics of ``train_set`` in ``vae``'s config.

    The channels of a small VAE's latents have very different means and spreads; one
    scalar scale leaves some channels with a content std far below the noise's, and the
    flow then spends most of its trajectory where the data is invisible under the noise.
    Statistics come from posterior samples, the latents the trainer draws.
    """
    _, latents = _evaluate(vae, DataLoader(train_set, batch_size=256), "cpu")  # (N, C, h, w)
    mean_c = latents.mean(dim=(0, 2, 3)).tolist()
    std_c = latents.std(dim=(0, 2, 3)).tolist()
    vae.register_to_config(latents_mean=mean_c, latents_std=std_c, scaling_factor=1.0, shift_factor=None)
    return mean_c, std_c


def train_vae(args: VAETrainArgs, cpu: bool = False) -> dict:
    out = Path(args.out)
    check_output(out, args.overwrite, args.replace_shipped, directory=True)
    accelerator = Accelerator(cpu=cpu)
    if accelerator.num_processes > 1:
        raise LatentflowError("train-vae runs on one process; start it with `python main.py train-vae`")
    set_seed(args.seed)
    data = DataConfig(image_size=args.image_size, max_items=args.max_items)
    train_set = build_dataset(data, channels=1)
    test_set = build_dataset(DataConfig(image_size=args.image_size, split="test", max_items=args.max_items), 1)
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=gen)
    test_loader = DataLoader(test_set, batch_size=256)

    vae = build_autoencoder(1, args.block_out_channels, args.latent_channels, args.image_size)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    total = args.epochs * len(train_loader)
    # cosine decay to 5 % of the peak rate
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    vae, optimizer = accelerator.prepare(vae, optimizer)
    device = accelerator.device
    n_params = sum(p.numel() for p in vae.parameters())
    accelerator.print(f"training AutoencoderKL ({n_params / 1e6:.2f} M parameters) on {len(train_set)} digits")

    start = time.perf_counter()
    bar = tqdm(range(total), disable=not accelerator.is_main_process, desc="vae")
    for epoch in range(args.epochs):
        for x, _, _ in train_loader:
            x = x.to(device)
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            mse = (recon - x).pow(2).mean()
            kl = posterior.kl().mean() / x[0].numel()  # per pixel, to match the MSE's scale
            loss = mse + args.kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            schedule.step()
            bar.update()
        bar.set_postfix(mse=f"{mse.item():.5f}", kl=f"{kl.item():.2f}")
    bar.close()
    train_seconds = time.perf_counter() - start

    vae = accelerator.unwrap_model(vae).cpu()
    metrics, _ = _evaluate(vae, test_loader, "cpu")
    mean_c, std_c = normalize_latents(vae, train_set)

    report = {
        "held_out": metrics,
        "train_seconds": round(train_seconds, 1),
        "parameters": n_params,
        "latents_mean": mean_c,
        "latents_std": std_c,
        "data": f"bundled MNIST: {len(train_set)} train / {len(test_set)} held-out digits at {args.image_size} px",
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()},
        "device": str(device),
    }
    with atomic_dir(out, "VAE") as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(report, indent=2))
    accelerator.print(
        f"saved {out}: held-out PSNR {metrics['psnr']:.2f} dB (pooled {metrics['psnr_pooled']:.2f}), "
        f"SSIM {metrics['ssim']:.4f}, trained {train_seconds / 60:.1f} min"
    )
    return report
