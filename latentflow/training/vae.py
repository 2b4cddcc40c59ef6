"""Training an ``AutoencoderKL`` for an experiment's data (``train-vae``): MNIST, an npz or a
folder of images, grey or colour, with the settings of the experiment's ``autoencoder``
section.

The objective is the reconstruction MSE plus a small KL term. Held-out images (MNIST's test
split, else a seeded ``autoencoder.held_out`` fraction) are reconstructed from the posterior
mean, as at sampling time, and scored with PSNR and SSIM after every epoch. The result is a
diffusers ``AutoencoderKL`` directory whose config stores per-channel latent statistics
(``latents_mean``/``latents_std``, ``scaling_factor`` 1, so that each scaled channel has zero
mean and unit variance): pass it as ``vae.pretrained`` to the flow trainer.

A VAE run is a run directory like the flow trainer's, and as reliable::

    <output-dir>/<name>-vae[+<hash>]-<time>/
        config.yaml, log.jsonl, tensorboard/, figures/reconstructions.png
        checkpoints/vae_step_00000420/   autoencoder.safetensors, optimizer.pt, rng.pt,
                                         state.json (with the files' SHA-256)
        vae/                             the AutoencoderKL (or where --out says)

Checkpoints are written atomically at every epoch's end and when a signal asks the run to
stop; ``--resume`` continues from the newest one that matches its hashes, exactly where it
was (data order and the posterior noise come from seeded generators that are saved).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import (
    AutoencoderConfig,
    ExperimentConfig,
    config_to_dict,
    read_yaml_mapping,
    recorded_overrides,
    save_config,
)
from ..console import Console
from ..data import Split, data_in_colour, to_uint8, train_and_held_out
from ..distributed import make_accelerator
from ..errors import CheckpointError, LatentflowError
from ..figures import save_reconstruction_figure
from ..files import FIX_RUN, atomic_dir, check_output, file_sha256, temp_name, write_text_atomic
from ..metrics import reconstruction_metrics
from ..rng import derive_seed
from ..runs import load_part, new_run_dir, run_base_name, runs_of
from ..signals import RunLock, StopRequest
from .checkpoints import set_aside
from .state import Interrupted
from .tracking import log_image, start_trackers, tracker_for

__all__ = ["VAEOptions", "build_autoencoder", "normalize_latents", "train_autoencoder"]

# Overrides that do not name a VAE run: the flow's sections, and what a continued run may change.
VAE_RUN_IGNORES = ("vae", "model", "flow", "sampler", "train", "autoencoder.epochs", "data.decode_workers")
CONTINUABLE = ("autoencoder.epochs", "data.decode_workers")
STEP_DIR = re.compile(r"^vae_step_(\d{8,})$")
FILES = {"model": "autoencoder.safetensors", "optimizer": "optimizer.pt", "rng": "rng.pt"}
KEEP = 2  # checkpoints kept on disk


@dataclass
class VAEOptions:
    """Where and how ``train-vae`` runs (the experiment says what it trains)."""

    output_dir: Path = Path("runs")
    resume: Optional[str] = None  # 'latest', a VAE run directory or one of its checkpoints
    out: Optional[Path] = None  # the AutoencoderKL directory (default: RUN/vae)
    cpu: bool = False
    overrides: Tuple[str, ...] = ()
    argv: Tuple[str, ...] = ()
    overwrite: bool = False  # replace a non-empty --out
    replace_shipped: bool = False  # only the maintainer script regenerates latentflow/assets


def build_autoencoder(in_channels: int, cfg: AutoencoderConfig, sample_size: int):
    from diffusers import AutoencoderKL

    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(32, min(cfg.block_out_channels)),
        sample_size=sample_size,
    )


# --- data -----------------------------------------------------------------------------------


# --- evaluation and latent statistics -------------------------------------------------------


def _to_model(u8: torch.Tensor, device) -> torch.Tensor:
    return u8.to(device).float() / 127.5 - 1.0


@torch.no_grad()
def reconstruct_all(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Reconstructions (in [-1, 1], on the CPU) from the posterior mean, as at sampling time."""
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    out = [
        vae.decode(vae.encode(_to_model(images[i : i + batch], device)).latent_dist.mean).sample.clamp(-1, 1).cpu()
        for i in range(0, len(images), batch)
    ]
    vae.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def normalize_latents(vae, images: torch.Tensor, seed: int, batch: int = 256) -> Tuple[List[float], List[float]]:
    """Store per-channel statistics of the posterior samples of ``images`` (the latents the
    flow trainer draws) in ``vae``'s config.

    The channels of a small VAE's latents have very different means and spreads; one scalar
    scale would leave some channels with a content spread far below the noise's, and the flow
    would spend most of its trajectory where the data is invisible under the noise."""
    device = next(vae.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    vae.eval()
    latents = torch.cat(
        [
            vae.encode(_to_model(images[i : i + batch], device)).latent_dist.sample(generator=gen).cpu()
            for i in range(0, len(images), batch)
        ]
    )
    mean_c = latents.mean(dim=(0, 2, 3)).tolist()
    std_c = latents.std(dim=(0, 2, 3)).tolist()
    vae.register_to_config(latents_mean=mean_c, latents_std=std_c, scaling_factor=1.0, shift_factor=None)
    return mean_c, std_c


def _figure_images(images: torch.Tensor, recon: torch.Tensor, k: int = 16) -> Tuple[np.ndarray, np.ndarray]:
    return to_uint8(_to_model(images[:k], "cpu")), to_uint8(recon[:k])


# --- checkpoints ----------------------------------------------------------------------------


def _checkpoints(run_dir: Path) -> List[Tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))] if root.is_dir() else []
    return sorted(found)


def _damage(ckpt: Path) -> Optional[str]:
    """Why a VAE checkpoint cannot be trusted, or None."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError):
        return "its state.json is missing or unreadable"
    files = state.get("files") if isinstance(state, dict) else None
    if not isinstance(files, dict):
        return "its state.json records no file hashes"
    for name in FILES.values():
        if not (ckpt / name).is_file():
            return f"it is incomplete (no {name})"
        if files.get(name) != file_sha256(ckpt / name):
            return f"{name} does not match the hash its state.json records"
    return None


def _save(run_dir: Path, step: int, vae, optimizer, gen: torch.Generator, state: dict) -> Path:
    from safetensors.torch import save_file

    final = run_dir / "checkpoints" / f"vae_step_{step:08d}"
    weights = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    with atomic_dir(final, "checkpoint", 4 * sum(t.nbytes for t in weights.values()), fix=FIX_RUN) as tmp:
        save_file(weights, str(tmp / FILES["model"]))
        torch.save(optimizer.state_dict(), tmp / FILES["optimizer"])
        torch.save({"noise": gen.get_state()}, tmp / FILES["rng"])
        hashes = {name: file_sha256(tmp / name) for name in FILES.values()}
        (tmp / "state.json").write_text(json.dumps({"kind": "autoencoder", **state, "files": hashes}, indent=2))
    for _, old in _checkpoints(run_dir)[:-KEEP]:
        doomed = temp_name(old)  # renamed first: a crash mid-delete never leaves half a checkpoint
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def _find_resume(resume: str, output_dir: Path, base: str, console: Console) -> Tuple[Path, Path]:
    """(run directory, checkpoint) that ``--resume`` names, passing over damaged checkpoints."""
    if resume == "latest":
        runs = [r for r in runs_of(output_dir, base) if _checkpoints(r)]
        if not runs:
            raise CheckpointError(f"--resume latest: no VAE run {base!r} with a checkpoint under {output_dir}")
        run = max(runs, key=lambda r: _checkpoints(r)[-1][1].stat().st_mtime)
        candidates = _checkpoints(run)
    else:
        path = Path(resume).expanduser()
        if STEP_DIR.match(path.name) and path.parent.name == "checkpoints":
            run, candidates = path.parent.parent, [(0, path)]
        elif (path / "config.yaml").is_file():
            run, candidates = path, _checkpoints(path)
        else:
            raise CheckpointError(f"--resume {resume}: not a VAE run directory or one of its checkpoints")
    for _, ckpt in reversed(candidates):
        why = _damage(ckpt)
        if why is None:
            return run, ckpt
        console.line(f"--resume: passing over {ckpt}: {why}")
    raise CheckpointError(f"--resume {resume}: {run} has no intact checkpoint; start a new run")


def _check_same_run(run_dir: Path, cfg: ExperimentConfig) -> None:
    saved = read_yaml_mapping(run_dir / "config.yaml", "run config")
    now = config_to_dict(cfg)
    for section in ("data", "autoencoder"):
        for key, value in now[section].items():
            old = (saved.get(section) or {}).get(key, value)
            if old != value and f"{section}.{key}" not in CONTINUABLE:
                raise CheckpointError(
                    f"cannot resume {run_dir}: it was trained with {section}.{key}={old!r}, this config says "
                    f"{value!r}; use the run's own config ({run_dir / 'config.yaml'}) or start a new run"
                )
    if saved.get("train", {}).get("seed", cfg.train.seed) != cfg.train.seed:
        raise CheckpointError(f"cannot resume {run_dir}: it was trained with another train.seed")


def _start_from(run_dir: Path, step: int, console: Console) -> None:
    """Make a resumed run's files agree with its checkpoint at ``step``: the checkpoints after
    it (passed over as damaged, or another timeline) go to ``checkpoints/set-aside-<time>/``
    and the log forgets the epochs after it."""
    newer = [p for s, p in _checkpoints(run_dir) if s > step]
    aside = set_aside(run_dir, newer, "set-aside")
    if aside:
        console.line(f"{run_dir}: moved the checkpoints after step {step} to {aside}")
    log = run_dir / "log.jsonl"
    if log.is_file():
        kept = [line for line in log.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_text_atomic(log, "".join(line + "\n" for line in kept), "log", FIX_RUN)


def _restore(ckpt: Path, vae, optimizer, gen: torch.Generator) -> dict:
    state = json.loads((ckpt / "state.json").read_text())
    weights = load_part(ckpt / FILES["model"])
    try:
        vae.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{ckpt} holds another autoencoder ({str(exc).splitlines()[0][:120]}); use its own config"
        ) from None
    optimizer.load_state_dict(load_part(ckpt / FILES["optimizer"]))
    gen.set_state(load_part(ckpt / FILES["rng"])["noise"])
    return state


# --- the loop ---------------------------------------------------------------------------------


def _lr(peak: float, step: int, total: int) -> float:
    """Cosine decay from the peak rate to 5 % of it over ``total`` steps (a run extended with
    more epochs decays over the new total)."""
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1))))


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, 7, epoch)))


def train_autoencoder(cfg: ExperimentConfig, options: VAEOptions, console: Optional[Console] = None) -> dict:
    """Train the autoencoder ``cfg.autoencoder`` describes on ``cfg.data`` (a new run under
    ``options.output_dir``, or ``options.resume`` continued); write the ``AutoencoderKL`` and
    return its report (also saved as ``training.json`` beside it)."""
    console = console or Console()
    accelerator = make_accelerator(
        "no", options.cpu, log_with=tracker_for(cfg.train.log_with), project_dir=str(options.output_dir)
    )
    if accelerator.num_processes > 1:
        raise LatentflowError("train-vae runs in one process; start it with `python main.py train-vae`")
    device, ac = accelerator.device, cfg.autoencoder
    base = run_base_name(f"{cfg.name}-vae", options.overrides, VAE_RUN_IGNORES)
    resume = _find_resume(options.resume, options.output_dir, base, console) if options.resume else None
    if resume:
        _check_same_run(resume[0], cfg)

    channels = 3 if data_in_colour(cfg.data) else 1
    images = train_and_held_out(cfg.data, channels, ac.held_out, cfg.train.seed)
    for line in (
        images.skipped,
        f"data: {images.about}, {channels} channel(s) ({'colour' if channels == 3 else 'grey'})",
    ):
        if line:
            console.line(line)
    if len(images.train) < ac.batch_size:
        raise LatentflowError(
            f"{images.about}: fewer training images than autoencoder.batch_size={ac.batch_size}; lower it"
        )
    torch.manual_seed(cfg.train.seed)
    vae = build_autoencoder(channels, ac, cfg.data.image_size).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=ac.lr, weight_decay=0.0)
    per_epoch = len(images.train) // ac.batch_size
    total = ac.epochs * per_epoch
    gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, 11))
    step = 0
    if options.out:
        check_output(options.out, options.overwrite, directory=True, replace_shipped=options.replace_shipped)
    lock = RunLock(resume[0] if resume else new_run_dir(options.output_dir, base)).acquire()
    run_dir = lock.path.parent
    out = Path(options.out) if options.out else run_dir / "vae"  # a resumed run may replace its own
    try:
        if resume:
            step = _restore(resume[1], vae, optimizer, gen)["step"]
            _start_from(run_dir, step, console)
            console.line(f"resuming {run_dir} from {resume[1].name} (step {step} of {total})")
            save_config(cfg, run_dir / "config.yaml", recorded_overrides(run_dir / "config.yaml"))  # more epochs
        else:
            save_config(cfg, run_dir / "config.yaml", options.overrides)
        start_trackers(accelerator, run_dir, config_to_dict(cfg), step if resume else None)
        n_params = sum(p.numel() for p in vae.parameters())
        console.line(
            f"train-vae {run_dir}: AutoencoderKL {n_params / 1e6:.2f} M parameters, latents "
            f"{ac.latent_channels}x{cfg.data.image_size // 2 ** (len(ac.block_out_channels) - 1)}^2, "
            f"{ac.epochs} epochs of {per_epoch} steps on {device}"
        )
        report = _fit(cfg, vae, optimizer, gen, images, run_dir, step, total, accelerator, console, options)
        return _finish(cfg, vae, images, run_dir, out, report, console)
    finally:
        accelerator.end_training()
        lock.release()


def _fit(
    cfg,
    vae,
    optimizer,
    gen,
    images: Split,
    run_dir: Path,
    step: int,
    total: int,
    accelerator,
    console,
    options,
):
    ac, seed = cfg.autoencoder, cfg.train.seed
    per_epoch = len(images.train) // ac.batch_size
    stop = StopRequest(on_exit=console.line).install()
    started, first = time.perf_counter(), step
    metrics: Dict[str, float] = {}
    bar = console.bar(total, initial=step, desc="vae")
    try:
        vae.train()
        while step < total:
            epoch, position = divmod(step, per_epoch)
            order = _epoch_order(len(images.train), seed, epoch)
            for i in range(position, per_epoch):
                x = _to_model(images.train[order[i * ac.batch_size : (i + 1) * ac.batch_size]], accelerator.device)
                if cfg.data.hflip:
                    flip = torch.rand(len(x), generator=gen) < 0.5
                    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
                posterior = vae.encode(x).latent_dist
                recon = vae.decode(posterior.sample(generator=gen)).sample
                mse = (recon - x).pow(2).mean()
                kl = posterior.kl().mean() / x[0].numel()  # per pixel, on the MSE's scale
                loss = mse + ac.kl_weight * kl
                if not torch.isfinite(loss):
                    raise LatentflowError(
                        f"train-vae: the loss became {loss.item()} at step {step}; lower autoencoder.lr "
                        f"(now {ac.lr:g}) and start again"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for group in optimizer.param_groups:
                    group["lr"] = _lr(ac.lr, step, total)
                optimizer.step()
                step += 1
                bar.update()
                if stop.requested:
                    _save(run_dir, step, vae, optimizer, gen, {"step": step, "epoch": epoch})
                    reason, status = StopRequest.describe(stop.code)
                    raise Interrupted(
                        f"stopped on {reason} at step {step} of {total}, checkpoint written; continue with: "
                        f"python main.py train-vae {' '.join(_without_resume(options.argv))} --resume {run_dir}",
                        status,
                    )
            recon = reconstruct_all(vae, images.held_out)
            metrics = reconstruction_metrics(recon, _to_model(images.held_out, "cpu"))
            record = {"epoch": epoch + 1, "step": step, "mse": mse.item(), "kl": kl.item(), **metrics}
            accelerator.log({f"vae/{k}": v for k, v in record.items() if k not in ("epoch", "step")}, step=step)
            originals, recons = _figure_images(images.held_out, recon)
            log_image(
                accelerator,
                "vae/reconstructions",
                np.concatenate([np.concatenate(list(originals), 1), np.concatenate(list(recons), 1)], 0),
                step,
            )
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            _save(run_dir, step, vae, optimizer, gen, {"step": step, "epoch": epoch + 1, "held_out": metrics})
            bar.set_postfix(mse=f"{mse.item():.5f}", psnr=f"{metrics['psnr']:.2f}")
            console.line(
                f"epoch {epoch + 1}/{ac.epochs}: mse {mse.item():.5f}, held-out PSNR {metrics['psnr']:.2f} dB, "
                f"SSIM {metrics['ssim']:.4f}"
            )
    finally:
        bar.close()
        stop.uninstall()
    if not metrics:  # nothing left to train: score what the checkpoint holds
        metrics = reconstruction_metrics(reconstruct_all(vae, images.held_out), _to_model(images.held_out, "cpu"))
    return {"held_out": metrics, "train_seconds": round(time.perf_counter() - started, 1), "steps": step - first}


def _without_resume(argv: Sequence[str]) -> List[str]:
    out, skip = [], False
    for arg in argv:
        if skip or arg == "--resume":
            skip = not skip
            continue
        if not arg.startswith("--resume="):
            out.append(arg)
    return out


def _finish(cfg, vae, images: Split, run_dir: Path, out: Path, report: dict, console) -> dict:
    """Latent statistics, the reconstruction figure and the AutoencoderKL directory."""
    vae = vae.cpu()
    mean_c, std_c = normalize_latents(vae, images.train, cfg.train.seed)
    originals, recons = _figure_images(images.held_out, reconstruct_all(vae, images.held_out))
    figure = save_reconstruction_figure(originals, recons, run_dir / "figures" / "reconstructions.png")
    report = {
        **report,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "latents_mean": mean_c,
        "latents_std": std_c,
        "data": images.about,
        "autoencoder": config_to_dict(cfg)["autoencoder"],
        "run": str(run_dir),
    }
    with atomic_dir(out, "VAE", fix=FIX_RUN) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(report, indent=2))
        shutil.copy(figure, tmp / "reconstructions.png")
    write_text_atomic(run_dir / "training.json", json.dumps(report, indent=2), "report", FIX_RUN)
    console.line(f"reconstructions of held-out images: {figure}")
    return {**report, "out": str(out)}
