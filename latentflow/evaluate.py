"""Evaluation: Fréchet distance (FD) of samples to real data in a feature space, with its
uncertainty and the floor a perfect generator would reach, and class accuracy of
class-conditional samples.

**Feature nets.** ``digits``: the digit classifier latentflow ships (128-d features, 98 %
on held-out digits), which fits MNIST-like data only; ``inception``: the Inception-v3 pool
features of FID (2048-d, through torch-fidelity), when its weights are on this machine.
``auto`` picks the digit net for MNIST data, else Inception, else refuses in one line: FD in a
feature space that does not fit the data measures nothing (an FD of 272 and 0 % accuracy on
faces, said without a word, is what that looks like).

**References** follow the field's protocol (the ADM suite's reference batches): statistics
(mu, Sigma) of the *training set*, written by ``python main.py fd-stats`` or computed and
cached on first use, plus a *held-out* split where the data has one. Each reference comes
with its **floor**: the FD of real images the model never saw (the held-out split against
the training reference, the training images against the held-out one).

**Uncertainty and sample size.** FD is biased upwards by a term that shrinks with the number
of images, so an FD is only comparable to another computed from as many images. Every FD
is reported with a bootstrap standard deviation, and also at the floor's size ("matched"):
the mean and spread over disjoint subsets of the samples of that size. The ratio to the
floor uses the matched value.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .classifier import CLASSIFIER_DIR, load_classifier
from .config import DataConfig
from .data import build_dataset
from .errors import LatentflowError

__all__ = [
    "FDStats",
    "INCEPTION_WEIGHTS",
    "dataset_features",
    "evaluate_images",
    "evaluate_model",
    "fd_stats_command",
    "fd_with_spread",
    "feature_net",
    "frechet_distance",
    "matched_fd",
    "reference_for",
]

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
BOOTSTRAP = 50  # resamples for the FD spread


# --- the math ---------------------------------------------------------------------------------


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (negative round-off eigenvalues clipped)."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fd(mu_a, cov_a, mu_b, cov_b, sqrt_b: Optional[np.ndarray] = None) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))  (Heusel et al. 2017, eq. 6).

    Tr (S_a S_b)^(1/2) = Tr (S_b^(1/2) S_a S_b^(1/2))^(1/2), the sum of the square roots of
    the eigenvalues of a symmetric matrix: exact, and with S_b^(1/2) of a fixed reference
    computed once, fast enough for a bootstrap."""
    root = _psd_sqrt(cov_b) if sqrt_b is None else sqrt_b
    w = np.linalg.eigvalsh(root @ cov_a @ root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(w, 0, None)).sum())


@dataclass
class FDStats:
    """Mean and covariance of features of ``n`` images; ``feature_net`` names the net (an
    identity with a hash of its weights) and ``description`` the images."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    feature_net: str
    description: str

    @property
    def sigma_sqrt(self) -> np.ndarray:
        if getattr(self, "_sqrt", None) is None:
            self._sqrt = _psd_sqrt(self.sigma)
        return self._sqrt

    def fd(self, features: np.ndarray) -> float:
        f = np.asarray(features, np.float64)
        return _fd(f.mean(0), np.cov(f, rowvar=False), self.mu, self.sigma, self.sigma_sqrt)

    @classmethod
    def of(cls, features: np.ndarray, feature_net: str, description: str) -> "FDStats":
        f = np.asarray(features, np.float64)
        return cls(f.mean(0), np.cov(f, rowvar=False), len(f), feature_net, description)

    def save(self, path: Path) -> Path:
        from .runtime import atomic_file

        with atomic_file(Path(path), "FD statistics") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, mu=self.mu, sigma=self.sigma, n=self.n, feature_net=self.feature_net,
                         description=self.description, format="latentflow-fd-stats-1")
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "FDStats":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                values = {k: f[k] for k in f.files}
        except (OSError, ValueError) as exc:
            raise LatentflowError(f"--reference {path}: not an FD statistics file ({exc}); "
                                  "make one with `python main.py fd-stats`") from None
        if str(values.get("format", "")) != "latentflow-fd-stats-1" or not {"mu", "sigma", "n"} <= set(values):
            raise LatentflowError(f"--reference {path}: not an FD statistics file of latentflow; "
                                  "make one with `python main.py fd-stats`")
        mu, sigma = values["mu"], values["sigma"]
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise LatentflowError(f"--reference {path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        return cls(mu, sigma, int(values["n"]), str(values["feature_net"]), str(values["description"]))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return _fd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def fd_with_spread(features: np.ndarray, ref: FDStats, bootstrap: int = BOOTSTRAP, seed: int = 0) -> Tuple[float, float]:
    """FD of ``features`` (N, D) to ``ref``, and its bootstrap standard deviation."""
    f = np.asarray(features, np.float64)
    rng = np.random.default_rng(seed)
    draws = [ref.fd(f[rng.integers(0, len(f), len(f))]) for _ in range(bootstrap)]
    return ref.fd(f), float(np.std(draws))


def matched_fd(features: np.ndarray, ref: FDStats, n: int) -> Dict[str, float]:
    """FD at sample size ``n``: mean and standard deviation over the disjoint subsets of
    ``n`` samples that ``features`` holds (with fewer than 2 subsets, the bootstrap spread)."""
    f = np.asarray(features, np.float64)
    k = len(f) // n
    if k >= 2:
        values = [ref.fd(s) for s in np.split(f[: k * n], k)]
        return {"n": n, "subsets": k, "fd": float(np.mean(values)), "std": float(np.std(values))}
    fd, std = fd_with_spread(f[:n], ref)
    return {"n": min(n, len(f)), "subsets": 1, "fd": fd, "std": std}


# --- feature nets -----------------------------------------------------------------------------


class DigitNet:
    """The shipped digit classifier: 128-d features and a 10-way prediction."""

    name = "digits"

    def __init__(self, path: Path = CLASSIFIER_DIR):
        self.model, self.info = load_classifier(path)
        h = hashlib.sha256()
        for key, tensor in self.model.state_dict().items():
            h.update(key.encode())
            h.update(tensor.detach().cpu().numpy().tobytes())
        self.identity = f"digits@{h.hexdigest()[:16]}"
        self.dim = 128

    @staticmethod
    def why_not(data: DataConfig, channels: int, image_size: int) -> str:
        if data.source != "mnist":
            return (f"the digit classifier knows only MNIST digits, and this data is {data.source} {data.path}")
        if image_size != 32:
            return f"the digit classifier reads 32 px digits, and this data is {image_size} px"
        return ""

    @torch.no_grad()
    def run(self, images: np.ndarray, batch_size: int = 500) -> Tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, C) -> features (N, 128), predicted digits (N,)."""
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1  # (N, C, H, W) in [-1, 1]
        x = x.mean(1, keepdim=True) if x.shape[1] == 3 else x
        feats, preds = [], []
        for i in range(0, len(x), batch_size):
            f = self.model.features(x[i : i + batch_size])
            feats.append(f)
            preds.append(self.model.head(f).argmax(1))
        return torch.cat(feats).numpy(), torch.cat(preds).numpy()


class InceptionNet:
    """Inception-v3 pool features (2048-d), the space of FID, through torch-fidelity."""

    name = "inception"

    def __init__(self):
        path = self.weights_path()
        if not path.is_file():
            raise LatentflowError(
                f"Inception features need {INCEPTION_WEIGHTS} in {path.parent} (torch-fidelity's FID weights); "
                "copy it there from a connected machine"
            )
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                 feature_extractor_weights_path=str(path)).eval()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.identity, self.dim = f"inception-v3@{digest}", 2048

    @staticmethod
    def weights_path() -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS

    @torch.no_grad()
    def run(self, images: np.ndarray, batch_size: int = 100) -> Tuple[np.ndarray, None]:
        x = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 (N, C, H, W)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        feats = [self.model(x[i : i + batch_size].contiguous())[0] for i in range(0, len(x), batch_size)]
        return torch.cat(feats).numpy(), None


def feature_net(choice: str = "auto", data: Optional[DataConfig] = None, channels: int = 1, image_size: int = 32):
    """The feature net for ``data``: ``digits``, ``inception``, or ``auto`` (digits where
    they fit, else Inception where its weights are local, else a one-line refusal)."""
    if choice == "digits":
        return DigitNet()
    if choice == "inception":
        return InceptionNet()
    why = DigitNet.why_not(data or DataConfig(), channels, image_size)
    if not why:
        return DigitNet()
    if InceptionNet.weights_path().is_file():
        return InceptionNet()
    raise LatentflowError(
        f"no feature net fits this data: {why}; Inception features need {INCEPTION_WEIGHTS} in "
        f"{InceptionNet.weights_path().parent} (copy it there), or pass --feature-net digits to use the digit "
        "classifier anyway"
    )


# --- real data: features and reference statistics --------------------------------------------


def _uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def dataset_features(data: DataConfig, net, channels: int, num_images: Optional[int] = None,
                     batch_size: int = 500) -> Tuple[np.ndarray, np.ndarray]:
    """Features and labels of (the first ``num_images`` of) a dataset's images."""
    ds = build_dataset(data, channels=channels)
    n = len(ds) if num_images is None else min(num_images, len(ds))
    feats = []
    for start in range(0, n, batch_size):
        items = [ds[i] for i in range(start, min(n, start + batch_size))]
        bad = [(ds.files[it[2]], it[3]) for it in items if len(it) > 3 and it[3]]
        if bad:
            raise LatentflowError(f"{bad[0][0]}: {bad[0][1]}; fix or remove it")
        feats.append(net.run(_uint8(torch.stack([it[0] for it in items])))[0])
    return np.concatenate(feats), ds.labels[:n].numpy()


def _describe(data: DataConfig) -> str:
    where = data.path or "bundled"
    return f"{data.source} {where} ({data.split}, {data.image_size} px{'' if data.max_items is None else f', first {data.max_items}'})"


def reference_for(data: DataConfig, net, channels: int, cache_dir: Optional[Path] = None) -> Tuple[FDStats, np.ndarray]:
    """(stats, features) of a dataset, cached beside the latent caches (keyed by the
    dataset's fingerprint and the feature net)."""
    from .latents import default_cache_dir

    ds = build_dataset(data, channels=channels)
    key = hashlib.sha256(f"{ds.fingerprint()}|{net.identity}|{data.image_size}".encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / f"features-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                features = f["features"]
            return FDStats.of(features, net.identity, _describe(data)), features
        except (OSError, ValueError, KeyError):
            pass  # damaged: computed again below
    features, _ = dataset_features(data, net, channels)
    try:
        from .runtime import atomic_file

        with atomic_file(path, "feature cache") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=features.astype(np.float32))
    except LatentflowError:
        pass  # a cache is a convenience: a read-only cache directory only costs time
    return FDStats.of(features, net.identity, _describe(data)), features


def held_out(data: DataConfig) -> Optional[DataConfig]:
    """The split of ``data`` a model never trains on, where the source has one."""
    from dataclasses import replace

    if data.source == "mnist":
        return replace(data, split="test" if data.split == "train" else "train", max_items=None)
    return None


# --- samples ----------------------------------------------------------------------------------


def evaluate_images(images: np.ndarray, labels: np.ndarray, net, references: List[Dict]) -> Dict:
    """Score uint8 samples (N, H, W, C) against each reference
    ``{"name", "stats": FDStats, "floor": features of held-out real images or None, "floor_of": str}``;
    class accuracy where the net predicts classes and the samples are labelled."""
    features, predictions = net.run(images)
    result = {"num_samples": len(images), "feature_net": net.identity, "references": {}}
    if predictions is not None and (labels >= 0).all():
        result["accuracy"] = float((predictions == labels).mean())
    for ref in references:
        stats = ref["stats"]
        if stats.feature_net != net.identity:
            raise LatentflowError(f"reference {ref['name']!r} was computed with {stats.feature_net}, not {net.identity}; "
                                  "compute it again with `python main.py fd-stats`")
        fd, std = fd_with_spread(features, stats)
        entry = {"description": stats.description, "reference_images": stats.n, "fd": fd, "fd_std": std}
        if ref.get("floor") is not None:  # both at the same size: the smaller of the two sets
            n = min(len(features), len(ref["floor"]))
            matched, floor = matched_fd(features, stats, n), matched_fd(ref["floor"], stats, n)
            entry.update(floor={**floor, "of": ref["floor_of"]}, matched=matched,
                         ratio=matched["fd"] / floor["fd"] if floor["fd"] > 0 else None)
        result["references"][ref["name"]] = entry
    return result


def references_for_run(data: DataConfig, net, channels: int, reference: Optional[Path] = None,
                       cache_dir: Optional[Path] = None) -> List[Dict]:
    """The training-set reference (with the held-out split as its floor) and the held-out
    reference (with training images as its floor), or the ``reference`` file given."""
    if reference is not None:
        stats = FDStats.load(reference)
        return [{"name": Path(reference).stem, "stats": stats, "floor": None}]
    from dataclasses import replace

    train_cfg = replace(data, split="train") if data.source == "mnist" else data
    train_stats, train_features = reference_for(train_cfg, net, channels, cache_dir)
    refs = [{"name": "train", "stats": train_stats, "floor": None}]
    other = held_out(train_cfg)
    if other is not None:
        test_stats, test_features = reference_for(other, net, channels, cache_dir)
        refs[0].update(floor=test_features, floor_of=f"{len(test_features)} held-out images ({other.split} split)")
        # the held-out reference's floor: as many training images as it has
        refs.append({"name": "held-out", "stats": test_stats, "floor": train_features,
                     "floor_of": f"{len(train_features)} training images"})
    return refs


def summary_line(result: Dict) -> str:
    parts = []
    if "accuracy" in result:
        parts.append(f"accuracy {result['accuracy']:.2%}")
    for name, r in result["references"].items():
        text = f"{name}: FD {r['fd']:.3f} ± {r['fd_std']:.3f}"
        if "floor" in r:
            m, f = r["matched"], r["floor"]
            text += (f" (at {m['n']}: {m['fd']:.3f} ± {m['std']:.3f} vs floor {f['fd']:.3f} ± {f['std']:.3f}: "
                     f"{r['ratio']:.2f}x)")
        parts.append(text)
    return "  |  ".join(parts)


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
    out: Optional[Path] = None,
    overwrite: bool = False,
    device=None,
) -> Dict:
    """``python main.py evaluate``: sample from any model source and score the samples against
    the run data's references. Writes the report as JSON (default ``RUN/eval/<settings>.json``)
    and returns it, with a one-line ``summary``."""
    import time

    from .pipeline import default_output, load_pipeline
    from .runtime import check_output, write_text_atomic
    from .sampling import sample_images

    if out is not None:
        check_output(Path(out), overwrite)
    pipe, cfg, _ = load_pipeline(source, device, with_info=True)
    data = cfg.data if cfg is not None else DataConfig()
    channels = int(pipe.vae.config.in_channels)
    net = feature_net(feature_net_choice, data, channels, data.image_size)
    c = pipe.config
    solver, steps = solver or c.solver, steps or c.num_inference_steps
    scale = c.guidance_scale if cfg_scale is None else cfg_scale
    interval = c.guidance_interval if guidance_interval is None else (list(guidance_interval) or None)
    labels = None if pipe.num_classes == 0 or unconditional else [i % pipe.num_classes for i in range(num_samples)]
    if labels is None:
        scale = 0.0  # no labels: the unconditional velocity, which is guidance scale 0
    references = references_for_run(data, net, channels, reference)
    start = time.perf_counter()
    samples = sample_images(
        pipe.transformer, pipe.frozen_vae(), pipe.latent_shape, labels, num_samples, solver=solver, steps=steps,
        cfg_scale=scale, guidance_interval=interval, atol=c.atol, rtol=c.rtol,
        generator=torch.Generator().manual_seed(seed), batch_size=batch_size,
    )
    seconds = time.perf_counter() - start
    result = evaluate_images(samples.images, samples.labels, net, references)
    settings = {"solver": solver, "steps": steps if solver != "dopri5" else None, "nfe": samples.nfe,
                "cfg_scale": scale, "guidance_interval": interval, "seed": seed, "num_samples": num_samples,
                "labels": "unconditional" if labels is None else "balanced, i % num_classes"}
    report = {**result, "settings": settings, "sampling_seconds": round(seconds, 1), "checkpoint": str(source)}
    if isinstance(net, DigitNet):
        report["feature_net_test_accuracy"] = net.info["test_accuracy"]
    if out is None:
        tag = f"{solver}-{steps}-cfg{scale:g}" + (f"-int{interval[0]:g}-{interval[1]:g}" if interval else "")
        out = default_output(source, "eval", f"{tag}-n{num_samples}-seed{seed}.json")
    write_text_atomic(Path(out), json.dumps(report, indent=2), "evaluation report")
    steps_text = "" if solver == "dopri5" else f" {steps}"
    report["summary"] = (f"{summary_line(result)}  |  {solver}{steps_text} NFE {samples.nfe}, cfg {scale:g}, "
                         f"{num_samples} samples in {seconds:.0f} s  ->  {out}")
    report["path"] = str(out)
    return report


def fd_stats_command(data: DataConfig, out: Path, num_images: Optional[int] = None, choice: str = "auto",
                     channels: int = 1, overwrite: bool = False) -> str:
    """``python main.py fd-stats``: write a reference statistics file of a dataset."""
    from .runtime import check_output

    check_output(Path(out), overwrite)
    net = feature_net(choice, data, channels, data.image_size)
    features, _ = dataset_features(data, net, channels, num_images)
    stats = FDStats.of(features, net.identity, _describe(data))
    stats.save(out)
    return f"FD statistics of {stats.n} images of {stats.description} ({net.identity}, {net.dim}-d) -> {out}"
