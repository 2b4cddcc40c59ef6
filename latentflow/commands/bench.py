"""``python main.py bench``: training throughput of the baseline loop (the latent-FM MNIST
program latentflow grew from) against latentflow's, in one process and one run, on the
same model and machine.

Configurations (images/s = median over timed windows after warm-up):

  (a) baseline  per-batch VAE encode + ``latent_dist.sample()``, fp32, batch 32: the baseline's loop
  (b) cache     latents from the cache (z = mean + std * eps), fp32, batch 32
  (c) bf16      (b) under bf16 autocast
  (d) batch     (b) or (c), whichever is faster, at larger batches
  (e) compile   the best of (d) under ``torch.compile`` (opt-in on CPU: compiling takes minutes);
      and the best of (d) with the other attention path: PyTorch's fused kernel on a CPU (the
      DiT runs timm's composite attention there), the composite one elsewhere
  (f) meanflow  the best of (d) with the average-velocity objective (flow.objective=meanflow: a
      forward-mode derivative pass and a guidance pass), and its cost per step against (d)'s
      (its GFLOP/s column still counts a cfm step's FLOPs); then the same with the derivative
      by a forward difference (flow.derivative=difference: plain passes, two more in float32 under bf16)

All use the same loss code as training (``training.objective.training_loss``) and AdamW. Achieved
GFLOP/s counts the DiT step only, as 3 x the forward FLOPs of ``DiT.flops_per_sample``
(backward ~ 2 x forward; the formula is in that docstring); the matmul peak is a large
square matmul in the same dtype, measured in the same run.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..config import FlowConfig
from ..errors import LatentflowError
from ..models import create_model
from ..training.objective import training_loss

__all__ = ["BenchSettings", "main", "matmul_peak", "run_bench"]


@dataclass
class BenchSettings:
    model: str = "DiT-B/2"
    latent_size: int = 4  # 4x4x4: MNIST 32 px through an SD-style VAE (8x downsampling)
    baseline_batch: int = 32
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
    # fallback paths of very different speeds (docs/performance.md); the DiT runs linear layers.
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


def _baseline_vae(tiny: bool):
    """The SD VAE architecture (random weights are fine for timing)."""
    from diffusers import AutoencoderKL

    channels = (8, 8, 8, 8) if tiny else (128, 256, 512, 512)
    return (
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=1 if tiny else 2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=channels,
            norm_num_groups=min(32, channels[0]),
            sample_size=32,
        )
        .eval()
        .requires_grad_(False)
    )


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
    return {
        "images_per_s": statistics.median(rates),
        "windows": rates,
        "steps_per_window": steps,
        "warmup_seconds": round(first, 2),
        "peak_memory_mb": round(_peak_memory_mb(device), 1),
    }


class _Bench:
    """One benchmark run: the device, the matmul peaks, the rows measured so far."""

    def __init__(self, s: BenchSettings, device: torch.device, log: Callable):
        self.s, self.device, self.log = s, device, log
        self.model_name = "DiT-Nano/2" if s.tiny and s.model == BenchSettings.model else s.model  # --model wins
        self.flow = FlowConfig()
        self.results: List[Dict] = []
        model, _ = self.new_model()
        self.train_flops = 3 * model.flops_per_sample()  # per image
        self.peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
        log(f"matmul peak: fp32 {self.peaks['fp32']:.0f} GFLOP/s, bf16 {self.peaks['bf16']:.0f} GFLOP/s on {device}")
        # Fixed in-memory data: a cache of posterior moments and labels.
        n, side, gen = 2048, s.latent_size, torch.Generator().manual_seed(0)
        self.cache_mean = torch.randn(n, 4, side, side, generator=gen).to(device)
        self.cache_std = 0.1 * torch.rand(n, 4, side, side, generator=gen).to(device)
        self.cache_labels = torch.randint(0, 10, (n,), generator=gen).to(device)

    def new_model(self, two_times: bool = False):
        torch.manual_seed(0)
        try:
            m = create_model(
                self.model_name, sample_size=self.s.latent_size, in_channels=4, num_classes=10, two_times=two_times
            )
        except ValueError as exc:
            raise LatentflowError(f"--model {self.model_name} with --latent-size {self.s.latent_size}: {exc}") from None
        m = m.to(self.device)
        return m, torch.optim.AdamW(m.parameters(), lr=1e-4)

    def dit_step(self, m, o, x1, labels, bf16: bool, derivative: str = "jvp") -> None:
        jumps = bool(getattr(m, "config", {}).get("two_times"))  # an average-velocity model: MeanFlow's loss
        flow = replace(self.flow, objective="meanflow", derivative=derivative) if jumps else self.flow
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            per_sample, _, _ = training_loss(m, x1, labels, flow, 0.1, m.null_label, cfg_scale=1.5 if jumps else 1.0)
        per_sample.mean().backward()
        o.step()
        o.zero_grad(set_to_none=True)

    def cached_step(self, m, o, batch: int, bf16: bool, scale: float, derivative: str = "jvp") -> Callable[[], None]:
        def step():
            idx = torch.randint(0, len(self.cache_labels), (batch,), device=self.device)
            z = self.cache_mean[idx] + self.cache_std[idx] * torch.randn_like(self.cache_std[idx])  # a posterior sample
            self.dit_step(m, o, z * scale, self.cache_labels[idx], bf16, derivative)

        return step

    def record(self, name: str, batch: int, precision: str, step: Callable[[], None], **extra) -> Dict:
        row = {
            "config": name,
            "batch": batch,
            "precision": precision,
            **_measure(step, batch, self.device, self.s),
            **extra,
        }
        row["dit_gflops_per_s"] = row["images_per_s"] * self.train_flops / 1e9
        row["fraction_of_peak"] = row["dit_gflops_per_s"] / self.peaks[precision]
        self.results.append(row)
        base = self.results[0]["images_per_s"]
        self.log(
            f"  {name:28s} batch {batch:4d} {precision:5s} {row['images_per_s']:9.1f} img/s  "
            f"x{row['images_per_s'] / base:5.2f}  {row['dit_gflops_per_s']:8.1f} GFLOP/s "
            f"({100 * row['fraction_of_peak']:4.1f}% of {precision} peak)  {row['peak_memory_mb']:.0f} MB"
        )
        return row


def _baseline_and_cache(bench: _Bench, model, opt) -> tuple:
    """(a) the baseline loop, (b) the latent cache, (c) with bf16; returns (scale, best row, bf16?)."""
    s, device = bench.s, bench.device
    vae = _baseline_vae(s.tiny).to(device)
    scale = float(vae.config.scaling_factor)
    side = s.latent_size * 8  # the SD VAE downsamples 8x: images whose latents the DiT takes
    images = torch.rand(s.baseline_batch, 3, side, side, device=device) * 2 - 1

    def baseline_step():
        with torch.no_grad():
            z = vae.encode(images).latent_dist.sample() * scale
        bench.dit_step(model, opt, z, bench.cache_labels[: s.baseline_batch], bf16=False)

    bench.log(
        f"{bench.model_name} on {s.latent_size}x{s.latent_size}x4 latents "
        f"({bench.train_flops / 1e9:.2f} GFLOP per training image)"
    )
    bench.record("(a) baseline: VAE every batch", s.baseline_batch, "fp32", baseline_step)
    b = bench.record(
        "(b) latent cache", s.baseline_batch, "fp32", bench.cached_step(model, opt, s.baseline_batch, False, scale)
    )
    c = bench.record(
        "(c) cache + bf16 autocast",
        s.baseline_batch,
        "bf16",
        bench.cached_step(model, opt, s.baseline_batch, True, scale),
    )
    best_bf16 = c["images_per_s"] > b["images_per_s"]
    return scale, (c if best_bf16 else b), best_bf16


def run_bench(s: BenchSettings, device: Optional[torch.device] = None, log: Callable = print) -> Dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    bench = _Bench(s, device, log)
    model, opt = bench.new_model()
    scale, best, bf16 = _baseline_and_cache(bench, model, opt)
    precision = "bf16" if bf16 else "fp32"
    for batch in s.batches:  # (d) the batch sweep at the faster precision
        if batch != s.baseline_batch:
            row = bench.record(
                f"(d) batch {batch}", batch, precision, bench.cached_step(model, opt, batch, bf16, scale)
            )
            best = row if row["images_per_s"] > best["images_per_s"] else best
    batch = best["batch"]
    fused = device.type == "cpu"  # (e) the attention path the DiT does not pick here, then torch.compile
    model.fused_attention = fused
    name = "(e) fused attention kernel" if fused else "(e) composite attention"
    bench.record(name, batch, precision, bench.cached_step(model, opt, batch, bf16, scale))
    model.fused_attention = None
    # (f) the MeanFlow objective (forward-mode derivative, guidance pass) at the same batch
    jumper, jopt = bench.new_model(two_times=True)
    for derivative in ("jvp", "difference"):
        step = bench.cached_step(jumper, jopt, batch, bf16, scale, derivative)
        name = "(f) meanflow objective" + (", difference derivative" if derivative == "difference" else "")
        row = bench.record(name, batch, precision, step)
        row["step_cost_vs_cfm"] = best["images_per_s"] / row["images_per_s"]
        log(
            f"  a meanflow step ({derivative}) costs {row['step_cost_vs_cfm']:.2f}x a cfm step"
            f" ({best['config']}, same batch)"
        )
    if s.compile:
        compiled, copt = bench.new_model()
        bench.record(
            "(e) torch.compile", batch, precision, bench.cached_step(torch.compile(compiled), copt, batch, bf16, scale)
        )
    return _summary(bench)


def _summary(bench: _Bench) -> Dict:
    results = bench.results
    fastest = max(results[1:], key=lambda r: r["images_per_s"])
    summary = {
        "device": str(bench.device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": bench.model_name,
        "latent_shape": [4, bench.s.latent_size, bench.s.latent_size],
        "train_gflop_per_image": bench.train_flops / 1e9,
        "flop_formula": "3 x DiT.flops_per_sample()",
        "matmul_peak_gflops": bench.peaks,
        "results": results,
        "best": {
            "config": fastest["config"],
            "batch": fastest["batch"],
            "precision": fastest["precision"],
            "speedup_vs_baseline": fastest["images_per_s"] / results[0]["images_per_s"],
            "fraction_of_peak": fastest["fraction_of_peak"],
        },
    }
    bench.log(
        f"best: {fastest['config']} (batch {fastest['batch']}, {fastest['precision']}): "
        f"x{summary['best']['speedup_vs_baseline']:.2f} the baseline loop, {100 * fastest['fraction_of_peak']:.1f}% "
        f"of the {fastest['precision']} matmul peak"
    )
    return summary


def write_json(summary: Dict, path: Path) -> None:
    from ..files import write_text_atomic

    write_text_atomic(Path(path), json.dumps(summary, indent=2), "benchmark report")


def main(args) -> None:
    from ..files import check_output
    from . import device_for

    batches = tuple(int(b) for b in args.batches.split(","))
    settings = BenchSettings(
        model=args.model,
        latent_size=args.latent_size,
        baseline_batch=args.baseline_batch,
        batches=batches,
        window_seconds=args.window_seconds,
        windows=args.windows,
        compile=args.compile,
        tiny=args.tiny,
    )
    if args.json:
        check_output(args.json, args.overwrite)
    summary = run_bench(settings, device=device_for(args.cpu))
    if args.json:
        write_json(summary, args.json)
        print(f"wrote {args.json}")
