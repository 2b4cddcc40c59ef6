"""Scoring samples: FD with its spread against each reference, the matched floor, and class
accuracy where the feature net predicts classes."""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from ..errors import LatentflowError
from ..metrics import precision_recall
from .fd import fd_with_spread, matched_fd

__all__ = ["evaluate_images", "summary_line"]


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
            raise LatentflowError(
                f"reference {ref['name']!r} was computed with {stats.feature_net}, not {net.identity}; "
                "compute it again with `python main.py fd-stats`"
            )
        fd, std = fd_with_spread(features, stats)
        entry = {"description": stats.description, "reference_images": stats.n, "fd": fd, "fd_std": std}
        if ref.get("floor") is not None:  # both at the same size: the smaller of the two sets
            n = min(len(features), len(ref["floor"]))
            matched, floor = matched_fd(features, stats, n), matched_fd(ref["floor"], stats, n)
            entry.update(
                floor={**floor, "of": ref["floor_of"]},
                matched=matched,
                ratio=matched["fd"] / floor["fd"] if floor["fd"] > 0 else None,
            )
        result["references"][ref["name"]] = entry
        if ref.get("real") is not None:
            result["precision_recall"] = _precision_recall(features, ref)
    return result


def _precision_recall(features: np.ndarray, ref: Dict, seed: int = 0) -> Dict:
    """Precision and recall of the samples against the reference's real images at equal sizes
    (a seeded subset of the larger set), and the same for the floor's images at that size."""
    real = np.asarray(ref["real"])
    n = min(len(features), len(real))
    pick = np.random.default_rng(seed).permutation(len(real))[:n]
    out = {**precision_recall(real[pick], features[:n]), "n": n, "against": ref["name"]}
    floor = ref.get("floor")
    if floor is not None:
        m = min(len(floor), n)
        f = precision_recall(real[pick[:m]], np.asarray(floor)[:m])
        out["floor"] = {"precision": f["precision"], "recall": f["recall"], "n": m, "of": ref.get("floor_of")}
    return out


def summary_line(result: Dict) -> str:
    parts = []
    if "accuracy" in result:
        parts.append(f"accuracy {result['accuracy']:.2%}")
    for name, r in result["references"].items():
        text = f"{name}: FD {r['fd']:.3f} ± {r['fd_std']:.3f}"
        if "floor" in r:
            m, f = r["matched"], r["floor"]
            text += (
                f" (at {m['n']}: {m['fd']:.3f} ± {m['std']:.3f} vs floor {f['fd']:.3f} ± {f['std']:.3f}: "
                f"{r['ratio']:.2f}x)"
            )
        parts.append(text)
    pr = result.get("precision_recall")
    if pr:
        parts.append(
            f"precision {pr['precision']:.3f} ± {pr['precision_std']:.3f}, recall {pr['recall']:.3f} ± "
            f"{pr['recall_std']:.3f} (k={pr['k']}, n={pr['n']})"
        )
    return "  |  ".join(parts)
