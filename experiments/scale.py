"""Scale test on this machine: the latent cache and the batch loader at 10x the data.

    python experiments/scale.py --work /tmp/latentflow-scale --out figures/scale.json

1. Writes an image folder of ``--images`` (default 100 000) distinct 32x32 digits: bundled
   MNIST digits, each shifted, rescaled in contrast and lightly noised (10 class folders).
2. Encodes it into a sharded cache with the shipped VAE, with 1 and with 2 processes
   (``accelerate launch``), each from an empty cache directory: throughput in images/s.
3. For 1/10 of the images and all of them (2 processes, warm cache): each rank reads a full
   epoch of batches through the memory-mapped cache, then trains DiT-S/2 steps on batches
   of the same size; every rank reports its peak resident memory (VmHWM), its anonymous
   memory (RssAnon, which a dataset held in memory would grow) and its time per batch
   against its time per optimizer step.
4. Counts the FLOPs of the SD-VAE encoder at 256 px and of a DiT-XL/2 training step, and
   works out an ImageNet-256 run on 8 H100s from them, the loader cost measured in 3 and
   the published throughputs of fast-DiT and LightningDiT (``on_paper``).

Writes the numbers as JSON and a two-panel figure beside it. Every launch is a separate
process tree, so peaks are per phase. The per-rank part (``rank``) is what each launched
process runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def memory() -> dict:
    """This process's peak and current resident memory, MiB, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def cpu_model() -> str:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln for ln in info.splitlines() if ln.startswith("Flags")), "")
    return f"{model} ({'AVX512-BF16' if 'avx512_bf16' in flags else 'no native bf16'}, {os.cpu_count()} cores)"


# --- the image folder -------------------------------------------------------------------------


def write_folder(root: Path, count: int) -> None:
    """``count`` distinct 32x32 PNG digits in root/<label>/<i>.png, written once."""
    import numpy as np
    from PIL import Image

    from latentflow.data.mnist import bundled_mnist

    done = root / ".complete"
    if done.is_file() and int(done.read_text()) == count:
        return
    images, labels = bundled_mnist("train")  # (4500, 28, 28) uint8, (4500,)
    rng = np.random.default_rng(0)
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i in range(count):
        k = i % len(images)
        canvas = np.zeros((32, 32), np.float32)
        dy, dx = rng.integers(0, 5, size=2)
        canvas[dy : dy + 28, dx : dx + 28] = images[k] * rng.uniform(0.7, 1.0)
        canvas += rng.normal(0, 6, canvas.shape)
        Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).save(root / str(labels[k]) / f"{i:06d}.png")
    done.write_text(str(count))
    print(f"wrote {count} images to {root} in {time.perf_counter() - start:.0f} s", flush=True)


# --- what each launched rank runs ---------------------------------------------------------------


def rank_main(args) -> None:
    import numpy as np
    import torch

    from latentflow.config import load_config
    from latentflow.data import build_dataset
    from latentflow.distributed import make_accelerator
    from latentflow.latents import LatentBatches, load_or_build_cache
    from latentflow.models import create_model
    from latentflow.training.objective import training_loss
    from latentflow.vae import FrozenVAE

    cfg = load_config(overrides=["data.source=folder", f"data.path={args.folder}", f"data.max_items={args.items}"])
    acc = make_accelerator("no", True, 1, 600.0)
    vae = FrozenVAE.from_pretrained(cfg.vae.pretrained)
    dataset = build_dataset(cfg.data, channels=vae.in_channels)
    result = {
        "rank": acc.process_index,
        "processes": acc.num_processes,
        "items": len(dataset),
        "threads": torch.get_num_threads(),
    }
    start = time.perf_counter()
    cache, _ = load_or_build_cache(vae, dataset, Path(args.cache), acc, cfg.data, cfg.vae)
    result["cache_seconds"] = time.perf_counter() - start
    if args.phase == "train":
        batches = LatentBatches(cache, args.batch_size, acc.num_processes, acc.process_index, 1, seed=0)
        gen = torch.Generator().manual_seed(acc.process_index)
        start = time.perf_counter()
        for i in range(batches.iterations_per_epoch):  # one whole epoch: every mapped row read once
            mean, std, labels = batches.batch(0, i)
            z = vae.scale(mean + std * torch.randn(std.shape, generator=gen))
        result["loader_ms"] = 1000 * (time.perf_counter() - start) / batches.iterations_per_epoch
        result["after_loader"] = memory()  # an epoch read, no model yet
        result["loader_steps"] = batches.iterations_per_epoch
        result["latent_numel"] = int(z[0].numel())
        torch.manual_seed(0)
        model = create_model("DiT-S/2", sample_size=z.shape[-1], in_channels=z.shape[1], num_classes=10)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for i in range(args.model_steps + 2):
            mean, std, labels = batches.batch(1, i % batches.iterations_per_epoch)
            z = vae.scale(mean + std * torch.randn(std.shape, generator=gen))
            t0 = time.perf_counter()
            loss, _ = training_loss(model, z, labels, cfg.flow, 0.1, 10, gen)
            loss.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        result["model_step_ms"] = 1000 * float(np.median(times[2:]))  # the first two warm up
        result["model_params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    result.update(memory())
    Path(args.report).with_name(f"{Path(args.report).stem}-rank{acc.process_index}.json").write_text(json.dumps(result))
    acc.wait_for_everyone()
    acc.end_training()


# --- ImageNet-256 on 8 GPUs, on paper -----------------------------------------------------------------

IMAGENET_TRAIN = 1_281_167
H100_BF16_DENSE = 989e12  # FLOP/s, the SXM part's dense bf16 tensor peak (an H800 has the same)
A100_BF16_DENSE = 312e12
PUBLISHED = {  # training images/s per GPU for DiT-XL/2-sized models at 256 px on cached latents, that GPU's peak
    "fast-DiT, A100, mixed precision": (108.0, A100_BF16_DENSE),
    "LightningDiT, H800, bf16 + compile + SDPA": (660.0, H100_BF16_DENSE),
}


def jpeg_decode_ms(count: int = 200) -> float:
    """Milliseconds per image for the folder source's decoding of an ImageNet-sized JPEG
    (500x375, quality 90, a smooth photo-like picture) to 256x256 RGB, on one core."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from latentflow.data.folder import load_image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    picture = np.stack([np.sin(xx / 37.0 + c) * np.cos(yy / 23.0 - c) for c in range(3)], -1) * 90 + 128
    picture += rng.normal(0, 8, picture.shape)
    buf = io.BytesIO()
    Image.fromarray(picture.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "latentflow-scale-probe.jpg"
    path.write_bytes(buf.getvalue())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_image(path, 256, 3, "white")
        start = time.perf_counter()
        for _ in range(count):
            load_image(path, 256, 3, "white")
        return 1000 * (time.perf_counter() - start) / count
    finally:
        torch.set_num_threads(threads)
        path.unlink()


def on_paper(measured: dict) -> dict:
    """FLOPs counted on the real architectures (random weights, CPU, batch 1) and the arithmetic
    of an ImageNet-256 DiT-XL/2 run on 8 H100s from them and the published throughputs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from latentflow.commands.bench import _baseline_vae
    from latentflow.models import create_model

    vae = _baseline_vae(tiny=False)  # the SD-VAE architecture: 256 px -> 4x32x32
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(torch.zeros(1, 3, 256, 256))
    encode_flops = counter.get_total_flops()
    dit = create_model("DiT-XL/2", sample_size=32, in_channels=4, num_classes=1000)
    step_flops = 3 * dit.flops_per_sample()  # forward + backward (about twice the forward)
    gpus = 8
    per_image_bytes = 2 * 4 * 32 * 32  # mean and std, 4x32x32 each
    out = {
        "imagenet_train_images": IMAGENET_TRAIN,
        "gpus": gpus,
        "sd_vae_encode_gflop_per_image": encode_flops / 1e9,
        "dit_xl2_train_gflop_per_image": step_flops / 1e9,
        "dit_xl2_params_m": sum(p.numel() for p in dit.parameters()) / 1e6,
        "cache_gb": {
            dtype: IMAGENET_TRAIN * per_image_bytes * size / 1e9 for dtype, size in (("float32", 4), ("bfloat16", 2))
        },
        "epoch_minutes": {},
        "mfu": {},
    }
    for name, (rate, peak) in PUBLISHED.items():
        out["mfu"][name] = rate * step_flops / peak
        out["epoch_minutes"][name] = IMAGENET_TRAIN / (gpus * rate) / 60
    # the encode, at the MFU LightningDiT reaches, which convolutions at 256 px reach too
    mfu = out["mfu"]["LightningDiT, H800, bf16 + compile + SDPA"]
    encode_rate = gpus * mfu * H100_BF16_DENSE / encode_flops
    out["encode_images_per_s_at_that_mfu"] = encode_rate
    out["encode_minutes"] = IMAGENET_TRAIN / encode_rate / 60
    out["jpeg_decode_ms_per_image_one_core"] = jpeg_decode_ms()
    if measured:  # the loader's cost per image here, scaled by the latent's size
        per_row_us = measured["loader_ms"] * 1000 / measured["batch"]
        out["loader_us_per_image_here"] = per_row_us
        out["loader_us_per_image_at_4x32x32"] = per_row_us * (4 * 32 * 32) / measured["latent_numel"]
        out["loader_share_of_step_at_660_img_s"] = out["loader_us_per_image_at_4x32x32"] * 1e-6 * 660
    return out


# --- the orchestration ------------------------------------------------------------------------------


def launch(args, processes: int, phase: str, items: int, cache: Path, tag: str) -> dict:
    report = Path(args.work) / "reports" / f"{tag}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    for old in report.parent.glob(f"{tag}-rank*.json"):
        old.unlink()
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(processes),
        "--multi_gpu" if processes > 1 else "--cpu",
    ]
    cmd += [
        __file__,
        "rank",
        "--phase",
        phase,
        "--folder",
        str(args.folder),
        "--items",
        str(items),
        "--cache",
        str(cache),
        "--report",
        str(report),
        "--batch-size",
        str(args.batch_size),
        "--model-steps",
        str(args.model_steps),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: {tag} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(report.parent.glob(f"{tag}-rank*.json"))]
    out = {"processes": processes, "items": items, "wall_s": round(wall, 1), "ranks": ranks}
    print(
        f"{tag}: {wall:.1f} s wall, per rank: "
        + "; ".join(f"HWM {r['VmHWM']} MiB anon {r['RssAnon']} MiB" for r in ranks),
        flush=True,
    )
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    enc = results["encode"]
    a.bar(
        [f"{e['processes']} process{'es' if e['processes'] > 1 else ''}" for e in enc],
        [e["images_per_s"] for e in enc],
        color=["tab:blue", "tab:orange"],
    )
    a.set_ylabel("images/s")
    a.set_title(f"encoding {enc[0]['items']:,} images")
    sizes = [r["items"] for r in results["train"]]
    for pick, label in (
        (lambda x: x["after_loader"]["VmHWM"], "peak RSS, an epoch read (no model)"),
        (lambda x: x["VmHWM"], "peak RSS, then DiT-S steps"),
        (lambda x: x["RssAnon"], "anonymous RSS at the end"),
    ):
        b.plot(sizes, [max(pick(x) for x in r["ranks"]) for r in results["train"]], "o-", label=label)
    b.set_xscale("log")
    b.set_xticks(sizes, [f"{s:,}" for s in sizes])
    b.set_ylim(bottom=0)
    b.set_xlabel("images in the dataset")
    b.set_ylabel("MiB per rank (max over 2 ranks)")
    b.set_title("memory while training")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("rank")
    r.add_argument("--phase", choices=["encode", "train"], required=True)
    for name in ("--folder", "--cache", "--report"):
        r.add_argument(name, required=True)
    r.add_argument("--items", type=int, required=True)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--model-steps", type=int, default=10)
    p.add_argument("--work", default="/tmp/latentflow-scale")
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model-steps", type=int, default=10)
    p.add_argument("--out", default=str(REPO / "figures" / "scale.json"))
    args = p.parse_args()
    if args.command == "rank":
        return rank_main(args)

    work = Path(args.work)
    args.folder = work / "images"
    write_folder(args.folder, args.images)
    small = args.images // 10
    results = {
        "machine": cpu_model(),
        "platform": platform.platform(),
        "batch_size": args.batch_size,
        "command": "python experiments/scale.py " + " ".join(sys.argv[1:]),
        "encode": [],
        "train": [],
    }
    for procs in (1, 2):  # encode throughput, each from an empty cache
        cache = work / f"cache-encode-{procs}"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        run = launch(args, procs, "encode", args.images, cache, f"encode-{procs}")
        run["images_per_s"] = round(args.images / max(r["cache_seconds"] for r in run["ranks"]), 1)
        results["encode"].append(run)
    for items in (small, args.images):  # memory and loader cost on a warm cache, 2 ranks
        cache = work / "cache-encode-2"
        if items != args.images:
            cache = work / f"cache-{items}"
            launch(args, 2, "encode", items, cache, f"warm-{items}")
        results["train"].append(launch(args, 2, "train", items, cache, f"train-{items}"))
    big = results["train"][-1]["ranks"][0]
    results["paper"] = on_paper(
        {"loader_ms": big["loader_ms"], "batch": args.batch_size, "latent_numel": big["latent_numel"]}
    )
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
