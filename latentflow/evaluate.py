"""Offline evaluation of a trained model: Fréchet distance (FD) in the feature space of the
shipped digit classifier, class accuracy of class-conditional samples, and, when its
weights are present locally, Inception FID through torchmetrics.

The reference set is the bundled MNIST test split (500 held-out digits, 50 per class); the
real-data baseline is the FD of the 4 500 real training digits against the same reference,
so a model's FD reads against "as good as real data".
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from .classifier import load_classifier
from .config import DataConfig
from .data import build_dataset
from .errors import LatentflowError

__all__ = [
    "INCEPTION_WEIGHTS",
    "classifier_stats",
    "evaluate_images",
    "evaluate_model",
    "frechet_distance",
    "real_baseline",
]

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to feature sets a (N, D) and b (M, D):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))  (Heusel et al. 2017, eq. 6)."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # few samples in many dimensions: singular, handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as is usual
        eps = 1e-6 * np.eye(a.shape[1])
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def _to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, 1, H, W) in [-1, 1] (RGB averaged to gray)."""
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1
    return x.mean(1, keepdim=True) if x.shape[1] == 3 else x


@torch.no_grad()
def classifier_stats(images: np.ndarray, classifier=None, batch_size: int = 500) -> Dict[str, np.ndarray]:
    """Features (N, 128) and predicted labels (N,) of uint8 images."""
    classifier = classifier or load_classifier()[0]
    x = _to_model_range(images)
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        f = classifier.features(x[i : i + batch_size])
        feats.append(f)
        preds.append(classifier.head(f).argmax(1))
    return {"features": torch.cat(feats).numpy(), "predictions": torch.cat(preds).numpy()}


def _real_uint8(split: str) -> np.ndarray:
    ds = build_dataset(DataConfig(split=split), channels=1)
    return ds.images.permute(0, 2, 3, 1).numpy(), ds.labels.numpy()


def real_baseline(classifier=None) -> Dict[str, float]:
    """FD of the real training digits against the reference (test) digits."""
    ref, _ = _real_uint8("test")
    train, train_labels = _real_uint8("train")
    r, t = classifier_stats(ref, classifier), classifier_stats(train, classifier)
    return {"fd": frechet_distance(t["features"], r["features"]),
            "accuracy": float((t["predictions"] == train_labels).mean()), "num_images": len(train)}


def inception_fid(images: np.ndarray) -> Optional[float]:
    """Inception FID against the reference digits, or None (with one line) when the
    Inception weights are not on this machine."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not path.is_file():
        print(f"Inception FID skipped: needs {INCEPTION_WEIGHTS} in {path.parent} (torch-fidelity's FID weights)")
        return None
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        import torch_fidelity  # noqa: F401  (torchmetrics needs it for the Inception network)
    except ImportError:
        print("Inception FID skipped: needs the torch-fidelity package (pip install torch-fidelity)")
        return None

    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
    to_rgb = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous()  # noqa: E731
    ref, _ = _real_uint8("test")
    fid.update(to_rgb(ref), real=True)
    for i in range(0, len(images), 500):
        fid.update(to_rgb(images[i : i + 500]), real=False)
    return float(fid.compute())


def evaluate_images(images: np.ndarray, labels: np.ndarray, classifier=None, inception: bool = False) -> Dict:
    """FD against the reference digits and, for labelled samples, class accuracy."""
    classifier = classifier or load_classifier()[0]
    ref, _ = _real_uint8("test")
    s, r = classifier_stats(images, classifier), classifier_stats(ref, classifier)
    result = {"fd": frechet_distance(s["features"], r["features"])}
    if (labels >= 0).all():
        result["accuracy"] = float((s["predictions"] == labels).mean())
    if inception:
        result["inception_fid"] = inception_fid(images)
    return result


def evaluate_model(
    source: Path,
    *,
    num_samples: int = 5000,
    solver: Optional[str] = None,
    steps: Optional[int] = None,
    cfg_scale: Optional[float] = None,
    seed: int = 0,
    batch_size: int = 500,
    unconditional: bool = False,
    inception: bool = False,
    out: Optional[Path] = None,
    overwrite: bool = False,
    device=None,
) -> Dict:
    """``python main.py evaluate``: sample from any model source and score the samples.
    Writes the report as JSON (default ``RUN/eval/<settings>.json``) and returns it, with a
    one-line ``summary``."""
    import json
    import time

    from .pipeline import default_output, load_pipeline
    from .runtime import check_output, write_text_atomic
    from .sampling import sample_images

    if out is not None:
        check_output(Path(out), overwrite)
    classifier, classifier_info = load_classifier()
    pipe = load_pipeline(source, device)
    c = pipe.config
    solver, steps = solver or c.solver, steps or c.num_inference_steps
    scale = c.guidance_scale if cfg_scale is None else cfg_scale
    if scale < 0:
        raise LatentflowError(f"--cfg-scale {scale}: must be >= 0 (1 = no guidance)")
    labels = None if pipe.num_classes == 0 or unconditional else [i % pipe.num_classes for i in range(num_samples)]
    if labels is None:
        scale = 0.0  # no labels: the unconditional velocity, which is guidance scale 0
    start = time.perf_counter()
    result = sample_images(
        pipe.transformer, pipe.frozen_vae(), pipe.latent_shape, labels, num_samples, solver=solver, steps=steps,
        cfg_scale=scale, guidance_interval=c.guidance_interval, atol=c.atol, rtol=c.rtol,
        generator=torch.Generator().manual_seed(seed), batch_size=batch_size,
    )
    seconds = time.perf_counter() - start
    metrics = evaluate_images(result.images, result.labels, classifier, inception=inception)
    baseline = real_baseline(classifier)
    report = {
        **metrics,
        "real_fd": baseline["fd"],
        "settings": {"solver": solver, "steps": steps if solver != "dopri5" else None, "nfe": result.nfe,
                     "cfg_scale": scale, "guidance_interval": c.guidance_interval, "seed": seed,
                     "num_samples": num_samples,
                     "labels": "unconditional" if labels is None else "balanced, i % num_classes"},
        "reference": "bundled MNIST test split (500 digits); features: shipped digit classifier (128-d)",
        "classifier_test_accuracy": classifier_info["test_accuracy"],
        "real_baseline": baseline,
        "sampling_seconds": round(seconds, 1),
        "checkpoint": str(source),
    }
    out = Path(out) if out else default_output(source, "eval", f"{solver}-{steps}-cfg{scale:g}-n{num_samples}-seed{seed}.json")
    write_text_atomic(out, json.dumps(report, indent=2), "evaluation report")
    acc = f"accuracy {metrics['accuracy']:.2%}  |  " if "accuracy" in metrics else ""
    report["summary"] = (
        f"FD {metrics['fd']:.3f} (real digits: {baseline['fd']:.3f})  |  {acc}{solver} "
        f"{'' if solver == 'dopri5' else steps} NFE {result.nfe}, cfg {scale:g}, seed {seed}, "
        f"{num_samples} samples in {seconds:.0f} s  |  classifier test accuracy "
        f"{classifier_info['test_accuracy']:.2%}  ->  {out}"
    )
    report["path"] = str(out)
    return report
