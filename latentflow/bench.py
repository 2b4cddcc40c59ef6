"""``python main.py bench``: training throughput of a seed-style loop against latentflow's,
in one process and one run, on the same model and machine.

Configurations (images/s = median over timed windows after warm-up):

  (a) seed      per-batch VAE encode + ``latent_dist.sample()``, fp32, batch 32: the seed's loop
  (b) cache     latents from the cache (z = mean + std * eps), fp32, batch 32
  (c) bf16      (b) under bf16 autocast
  (d) batch     (b) or (c), whichever is faster, at larger batches
  (e) compile   the best of (d) under ``torch.compile`` (opt-in on CPU: compiling takes minutes);
      and the best of (d) with timm's fused attention (scaled_dot_product_attention) turned off

All use the same loss code as training (``train.training_loss``) and AdamW. Achieved
GFLOP/s counts the DiT step only, as 3 x the forward FLOPs of ``DiT.flops_per_sample``
(backward ~ 2 x forward; the formula is in that docstring); the matmul peak is a large
square matmul in the same dtype, measured in the same run.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .config import FlowConfig
from .errors import LatentflowError
from .models import create_model
from .train import training_loss

__all__ = ["BenchSettings", "matmul_peak", "run_bench"]


@dataclass
class BenchSettings:
    model: str = "DiT-B/2"
    latent_size: int = 4  # 4x4x4: MNIST 32 px through an SD-style VAE (8x downsampling)
    seed_batch: int = 32
    batches: tuple = (32, 64, 128, 256)
    window_seconds: float = 2.0  # aim for windows of about this long
    windows: int = 3
    compile: bool = False
    tiny: bool = False  # a seconds-long run for tests: a tiny VAE, and DiT-Nano/2 unless a model is named


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, target_seconds: float = 0.3) -> float:
    """GFLOP/s of a square matrix product sized to take about ``target_seconds`` (best of
    3 runs each of ``a @ b`` and ``linear(a, b)``)."""
    n = 256
    while True:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        took = time.perf_counter() - start
        if took > target_seconds / 4 or n >= (16384 if device.type == "cuda" else 4096):
            break
        n *= 2
    # Best of two kernels: on CPUs without native bf16, matmul and linear take different
    # fallback paths (0.9 vs 12 GFLOP/s on an AVX2 EPYC); the DiT runs linear layers.
    best = min(_timed(fn, device) for fn in (lambda: a @ b, lambda: torch.nn.functional.linear(a, b)) for _ in range(3))
    return 2 * n**3 / best / 1e9


def _timed(fn: Callable, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB -> MiB)


def _seed_vae(tiny: bool):
    """The SD VAE architecture (random weights are fine for timing)."""
    from diffusers import AutoencoderKL

    channels = (8, 8, 8, 8) if tiny else (128, 256, 512, 512)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1 if tiny else 2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels, norm_num_groups=min(32, channels[0]), sample_size=32,
    ).eval().requires_grad_(False)


def _measure(step: Callable[[], None], batch: int, device: torch.device, s: BenchSettings) -> Dict:
    """Warm up, size windows to ~window_seconds, return median images/s and peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = _timed(step, device)  # warm-up (allocations, autotuning, compilation)
    second = _timed(step, device)
    per_step = min(first, second)
    steps = max(1, int(s.window_seconds / max(per_step, 1e-6)))
    rates = []
    for _ in range(s.windows if per_step < 10 else 2):
        took = _timed(lambda: [step() for _ in range(steps)], device)
        rates.append(steps * batch / took)
    return {"images_per_s": statistics.median(rates), "windows": rates, "steps_per_window": steps,
            "warmup_seconds": round(first, 2), "peak_memory_mb": round(_peak_memory_mb(device), 1)}


def run_bench(s: BenchSettings, device: Optional[torch.device] = None, log: Callable = print) -> Dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model_name = "DiT-Nano/2" if s.tiny and s.model == BenchSettings.model else s.model  # --model wins
    flow = FlowConfig()
    results: List[Dict] = []

    def new_model():
        torch.manual_seed(0)
        try:
            m = create_model(model_name, sample_size=s.latent_size, in_channels=4, num_classes=10).to(device)
        except ValueError as exc:
            raise LatentflowError(f"--model {model_name} with --latent-size {s.latent_size}: {exc}") from None
        return m, torch.optim.AdamW(m.parameters(), lr=1e-4)

    model, opt = new_model()
    train_flops = 3 * model.flops_per_sample()  # per image
    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    log(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s on {device}")

    def dit_step(m, o, x1, labels, bf16: bool):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            per_sample, _ = training_loss(m, x1, labels, flow, 0.1, m.null_label)
        per_sample.mean().backward()
        o.step()
        o.zero_grad(set_to_none=True)

    def record(name: str, batch: int, precision: str, m: Dict, **extra) -> Dict:
        row = {"config": name, "batch": batch, "precision": precision, **m, **extra}
        row["dit_gflops_per_s"] = row["images_per_s"] * train_flops / 1e9
        row["fraction_of_peak"] = row["dit_gflops_per_s"] / peaks[precision]
        results.append(row)
        base = results[0]["images_per_s"]
        log(f"  {name:28s} batch {batch:4d} {precision:5s} {row['images_per_s']:9.1f} img/s  "
            f"x{row['images_per_s'] / base:5.2f}  {row['dit_gflops_per_s']:8.1f} GFLOP/s "
            f"({100 * row['fraction_of_peak']:4.1f}% of {precision} peak)  {row['peak_memory_mb']:.0f} MB")
        return row

    # Fixed in-memory data: a cache of posterior moments and labels, and raw images for (a).
    n_items = 2048
    gen = torch.Generator().manual_seed(0)
    cache_mean = torch.randn(n_items, 4, s.latent_size, s.latent_size, generator=gen).to(device)
    cache_std = 0.1 * torch.rand(n_items, 4, s.latent_size, s.latent_size, generator=gen).to(device)
    cache_labels = torch.randint(0, 10, (n_items,), generator=gen).to(device)

    def cached_batch(batch: int):
        idx = torch.randint(0, n_items, (batch,), device=device)
        z = cache_mean[idx] + cache_std[idx] * torch.randn_like(cache_std[idx])  # a fresh posterior sample
        return z, cache_labels[idx]

    # (a) the seed's loop: encode every batch, sample the posterior, fp32
    vae = _seed_vae(s.tiny).to(device)
    scale = float(vae.config.scaling_factor)
    side = s.latent_size * 8  # the SD VAE downsamples 8x: images whose latents the DiT takes
    images = torch.rand(s.seed_batch, 3, side, side, device=device) * 2 - 1

    def seed_step():
        with torch.no_grad():
            z = vae.encode(images).latent_dist.sample() * scale
        dit_step(model, opt, z, cache_labels[: s.seed_batch], bf16=False)

    log(f"{model_name} on {s.latent_size}x{s.latent_size}x4 latents ({train_flops / 1e9:.2f} GFLOP per training image)")
    record("(a) seed: VAE every batch", s.seed_batch, "fp32", _measure(seed_step, s.seed_batch, device, s))
    del vae

    def cached_step_fn(m, o, batch, bf16):
        def step():
            z, labels = cached_batch(batch)
            dit_step(m, o, z * scale, labels, bf16)
        return step

    # (b) cache, (c) + bf16
    b = record("(b) latent cache", s.seed_batch, "fp32", _measure(cached_step_fn(model, opt, s.seed_batch, False), s.seed_batch, device, s))
    c = record("(c) cache + bf16 autocast", s.seed_batch, "bf16", _measure(cached_step_fn(model, opt, s.seed_batch, True), s.seed_batch, device, s))
    best_bf16 = c["images_per_s"] > b["images_per_s"]
    precision = "bf16" if best_bf16 else "fp32"

    # (d) batch sweep at the faster precision
    best = b if not best_bf16 else c
    for batch in s.batches:
        if batch == s.seed_batch:
            continue
        row = record(f"(d) batch {batch}", batch, precision, _measure(cached_step_fn(model, opt, batch, best_bf16), batch, device, s))
        if row["images_per_s"] > best["images_per_s"]:
            best = row
    best_batch = best["batch"]

    # (e) fused attention off (timm's fallback path) and torch.compile
    for block in model.blocks:
        block.attn.fused_attn = False
    record("(e) unfused attention", best_batch, precision, _measure(cached_step_fn(model, opt, best_batch, best_bf16), best_batch, device, s))
    for block in model.blocks:
        block.attn.fused_attn = True
    if s.compile:
        compiled, copt = new_model()
        compiled = torch.compile(compiled)
        record("(e) torch.compile", best_batch, precision, _measure(cached_step_fn(compiled, copt, best_batch, best_bf16), best_batch, device, s))

    fastest = max(results[1:], key=lambda r: r["images_per_s"])
    summary = {
        "device": str(device), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": model_name, "latent_shape": [4, s.latent_size, s.latent_size],
        "train_gflop_per_image": train_flops / 1e9, "flop_formula": "3 x DiT.flops_per_sample()",
        "matmul_peak_gflops": peaks, "results": results,
        "best": {"config": fastest["config"], "batch": fastest["batch"], "precision": fastest["precision"],
                 "speedup_vs_seed": fastest["images_per_s"] / results[0]["images_per_s"],
                 "fraction_of_peak": fastest["fraction_of_peak"]},
    }
    log(f"best: {fastest['config']} (batch {fastest['batch']}, {fastest['precision']}): "
        f"x{summary['best']['speedup_vs_seed']:.2f} the seed loop, {100 * fastest['fraction_of_peak']:.1f}% of the "
        f"{fastest['precision']} matmul peak")
    return summary


def write_json(summary: Dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
