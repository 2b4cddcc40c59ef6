"""Training a small ``AutoencoderKL`` like the MNIST VAE that ships in
``latentflow/assets/mnist-vae``: an MSE + KL objective on the bundled digits (train split),
held-out PSNR/SSIM on the test split, and per-channel latent statistics stored in its
config (``latents_mean``/``latents_std``, with ``scaling_factor`` 1) so that each scaled
channel has zero mean and unit variance. The result is written with ``save_pretrained`` and
loads like any Hub VAE.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from ..config import DataConfig
from ..console import Console
from ..data import build_dataset
from ..errors import LatentflowError
from ..files import atomic_dir
from ..metrics import reconstruction_metrics

__all__ = ["VAETrainArgs", "build_autoencoder", "fit_vae", "normalize_latents"]


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


def _fit(vae, optimizer, schedule, train_loader, args: VAETrainArgs, accelerator, bar) -> None:
    for _ in range(args.epochs):
        for x, _, _ in train_loader:
            x = x.to(accelerator.device)
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


def fit_vae(args: VAETrainArgs, cpu: bool = False, console: Optional[Console] = None) -> dict:
    """Train the VAE that ``args`` describes and write it to ``args.out`` (atomically);
    returns the training report (also saved as ``training.json`` beside it)."""
    console = console or Console()
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=cpu)
    if accelerator.num_processes > 1:
        raise LatentflowError("train-vae runs on one process; start it with `python main.py train-vae`")
    set_seed(args.seed)
    train_set = build_dataset(DataConfig(image_size=args.image_size, max_items=args.max_items), channels=1)
    test_set = build_dataset(DataConfig(image_size=args.image_size, split="test", max_items=args.max_items), 1)
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=gen)
    vae = build_autoencoder(1, args.block_out_channels, args.latent_channels, args.image_size)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    total = args.epochs * len(train_loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # cosine decay to 5 % of the peak rate
        optimizer, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    vae, optimizer = accelerator.prepare(vae, optimizer)
    n_params = sum(p.numel() for p in vae.parameters())
    console.line(f"training AutoencoderKL ({n_params / 1e6:.2f} M parameters) on {len(train_set)} digits")
    start = time.perf_counter()
    bar = console.bar(total, desc="vae")
    _fit(vae, optimizer, schedule, train_loader, args, accelerator, bar)
    bar.close()
    train_seconds = time.perf_counter() - start
    vae = accelerator.unwrap_model(vae).cpu()
    metrics, _ = _evaluate(vae, DataLoader(test_set, batch_size=256), "cpu")
    mean_c, std_c = normalize_latents(vae, train_set)
    result = {
        "held_out": metrics,
        "train_seconds": round(train_seconds, 1),
        "parameters": n_params,
        "latents_mean": mean_c,
        "latents_std": std_c,
        "data": f"bundled MNIST: {len(train_set)} train / {len(test_set)} held-out digits at {args.image_size} px",
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()},
        "device": str(accelerator.device),
    }
    with atomic_dir(Path(args.out), "VAE") as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(result, indent=2))
    return result
