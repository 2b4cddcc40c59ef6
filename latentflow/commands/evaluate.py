"""``python main.py evaluate``: sample a trained model and score the samples against real
images: FD with its spread and the floor of the model's own training data, precision and
recall, class accuracy, and (``--solver-error N``) the sampler's distance from the ODE's
converged solution."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..config import DataConfig, ExperimentConfig, with_overrides
from ..files import check_output, write_text_atomic
from ..pipeline import load_pipeline
from . import default_output, device_for, say
from .sample import FLAG_NAMES

__all__ = ["evaluate_model", "main"]


def evaluate_model(
    source: Path,
    *,
    num_samples: int = 5000,
    solver: Optional[str] = None,
    steps: Optional[int] = None,
    cfg_scale: Optional[float] = None,
    guidance_interval: Optional[List[float]] = None,
    seed: int = 0,
    batch_size: int = 500,
    unconditional: bool = False,
    feature_net_choice: str = "auto",
    reference: Optional[Path] = None,
    solver_error: int = 0,
    out: Optional[Path] = None,
    overwrite: bool = False,
    device=None,
    names: Optional[Dict[str, str]] = None,
    data_overrides: Sequence[str] = (),
) -> Dict:
    """Sample from any model source and score the samples (``evaluation``). With
    ``solver_error=N``, also the RMS distance of the first N samples' latents from dopri5's
    at tolerance 1e-6. Real images are read by the run's own data settings (its bad-file
    policy included), with ``data_overrides`` (``data.key=value``) on top. Writes the report
    as JSON (default ``RUN/eval/<settings>.json``) and returns it, with a one-line ``summary``."""
    from ..evaluation import evaluate_images, feature_net, references_for_run, summary_line

    if out is not None:
        check_output(Path(out), overwrite)
    pipe, cfg, _ = load_pipeline(source, device, with_info=True)
    if data_overrides:
        cfg = with_overrides(cfg or ExperimentConfig(), data_overrides, sections=("data",))
    data = cfg.data if cfg is not None else DataConfig()
    channels = int(pipe.vae.config.in_channels)
    flag = (names or {}).get("feature_net", "feature_net_choice")
    net = feature_net(feature_net_choice, data, channels, data.image_size, flag=flag)
    sampler = dict(solver=solver, steps=steps, cfg_scale=cfg_scale, guidance_interval=guidance_interval)
    labels, settings = pipe.resolve("none" if unconditional else "all", num_samples, names, **sampler)
    if out is None:  # checked like a given --out, before any sampling
        name = _report_name(
            settings.tag, num_samples, seed, unconditional, feature_net_choice, reference, data_overrides
        )
        out = default_output(source, "eval", name)
        check_output(out, overwrite)
    references = references_for_run(data, net, channels, reference)
    start = time.perf_counter()
    samples = pipe.draw(
        labels,
        num_samples,
        generator=torch.Generator().manual_seed(seed),
        batch_size=batch_size,
        names=names,
        **settings.choices,
    )
    seconds = time.perf_counter() - start
    result = evaluate_images(samples.images, samples.labels, net, references)
    report = {
        **result,
        "settings": _settings_record(samples, labels, seed, num_samples),
        "sampling_seconds": round(seconds, 1),
        "checkpoint": str(source),
    }
    if hasattr(net, "test_accuracy"):
        report["feature_net_test_accuracy"] = net.test_accuracy
    if solver_error:
        report["solver_error"] = _solver_error(pipe, labels, samples, solver_error, seed, batch_size)
    s = samples.settings
    write_text_atomic(Path(out), json.dumps(report, indent=2), "evaluation report")
    steps_text = "" if s.solver == "dopri5" else f" {s.steps}"
    error = f", latent RMS error {report['solver_error']['rms']:.4f}" if solver_error else ""
    report["summary"] = (
        f"{summary_line(result)}  |  {s.solver}{steps_text} NFE {samples.nfe}, cfg {s.cfg_scale:g}"
        f"{error}, {num_samples} samples in {seconds:.0f} s  ->  {out}"
    )
    report["path"] = str(out)
    return report


def _report_name(
    tag: str, num_samples: int, seed: int, unconditional: bool, net: str, reference, data_overrides: Sequence[str]
) -> str:
    """The default report's file name: the sampler's settings and every other choice that
    changes the scores (the feature net, the reference, ``--set data.*`` as a short hash, the
    way runs are named), so that scoring the same samples another way writes another report."""
    from ..runs import run_base_name

    parts = [tag, f"n{num_samples}", f"seed{seed}"]
    parts += ["uncond"] if unconditional else []
    parts += [Path(net).name] if net != "auto" else []
    parts += [f"ref-{Path(reference).stem}"] if reference is not None else []
    return run_base_name("-".join(parts), data_overrides, ignore=()) + ".json"


def _settings_record(samples, labels, seed: int, num_samples: int) -> Dict:
    s = samples.settings
    return {
        "solver": s.solver,
        "steps": s.steps if s.solver != "dopri5" else None,
        "nfe": samples.nfe,
        "cfg_scale": s.cfg_scale,
        "guidance_interval": s.guidance_interval,
        "seed": seed,
        "num_samples": num_samples,
        "labels": "unconditional" if labels is None else "balanced, i % num_classes",
    }


def _solver_error(pipe, labels, samples, n: int, seed: int, batch_size: int) -> Dict:
    from ..evaluation.solver import REFERENCE_TOLERANCE, converged_latents, solver_error

    n = min(n, len(samples.latents))
    s = samples.settings
    reference, nfe = converged_latents(pipe, labels, n, seed, s.cfg_scale, s.guidance_interval, batch_size=batch_size)
    return {
        **solver_error(samples.latents[:n], reference),
        "reference": f"dopri5, atol = rtol = {REFERENCE_TOLERANCE:g}",
        "reference_nfe": nfe,
    }


def main(args) -> None:
    report = evaluate_model(
        args.checkpoint,
        num_samples=args.num_samples,
        solver=args.solver,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        guidance_interval=args.guidance_interval,
        seed=args.seed,
        batch_size=args.batch_size,
        unconditional=args.unconditional,
        feature_net_choice=args.feature_net,
        reference=args.reference,
        solver_error=args.solver_error,
        out=args.out,
        overwrite=args.overwrite,
        device=device_for(args.cpu),
        names=FLAG_NAMES,
        data_overrides=args.overrides,
    )
    say(report["summary"])
