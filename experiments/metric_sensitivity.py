"""How the evaluation's feature spaces respond to known degradations of real digits: FD
against degradation strength for the shipped digit net and the earlier, globally pooled
one, side by side, and precision and recall for dropped classes and duplicates.

    python experiments/metric_sensitivity.py --out figures/metric_sensitivity.png

Both nets see the same images: 2 000 of the bundled training digits, clean and degraded,
scored against the other 3 000 bundled digits as the reference (so that the two nets are
compared on data both can compute offline). FD is shown as its rise over the clean set's
FD in units of the clean set's bootstrap spread (the two spaces have different scales); a
curve that stays under 1 is a space blind to that fault.
Writes the figure and a JSON of every point beside it.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentflow.config import DataConfig
from latentflow.data import build_dataset
from latentflow.evaluation import FDStats, fd_with_spread, feature_net
from latentflow.evaluation.degradations import DEGRADATIONS, drop_classes, duplicate
from latentflow.figures import new_figure
from latentflow.metrics import precision_recall


def digits():
    train, test = build_dataset(DataConfig(), 1), build_dataset(DataConfig(split="test"), 1)
    images = np.concatenate([train.images.numpy(), test.images.numpy()]).transpose(0, 2, 3, 1)  # (N, 32, 32, 1)
    labels = np.concatenate([train.labels.numpy(), test.labels.numpy()])
    order = np.random.default_rng(0).permutation(len(images))
    probe, ref = order[:2000], order[2000:]
    return (images[probe], labels[probe]), images[ref]


def measure(net, probe, reference):
    images, labels = probe
    ref_features = net.run(reference)[0]
    stats = FDStats.of(ref_features, net.identity, "3 000 bundled digits")
    clean_features = net.run(images)[0]
    clean_fd, clean_std = fd_with_spread(clean_features, stats)
    rows = [{"fault": "none", "strength": 0, "fd": clean_fd, "fd_std": clean_std, "ratio": 1.0, "rise": 0.0}]
    for name, (fn, strengths) in DEGRADATIONS.items():
        for s in strengths:
            fd, std = fd_with_spread(net.run(fn(images, s, np.random.default_rng(1)))[0], stats)
            rows.append(
                {
                    "fault": name,
                    "strength": s,
                    "fd": fd,
                    "fd_std": std,
                    "ratio": fd / clean_fd,
                    "rise": (fd - clean_fd) / clean_std,
                }
            )
    pr = {"none": precision_recall(ref_features[:2000], clean_features)}
    for k in (1, 3, 5):
        pr[f"drop {k} classes"] = precision_recall(
            ref_features[:2000], net.run(drop_classes(images, labels, k, np.random.default_rng(2))[0])[0]
        )
    for c in (2, 4, 8):
        pr[f"{c} copies"] = precision_recall(
            ref_features[:2000], net.run(duplicate(images, labels, c, np.random.default_rng(3))[0])[0]
        )
    return rows, pr


def draw(results, out: Path) -> None:
    faults = list(DEGRADATIONS)
    fig, axes = new_figure(1, len(faults) + 1, figsize=(3.2 * (len(faults) + 1), 3.2), dpi=110)
    for ax, fault in zip(axes, faults):
        for name, (rows, _) in results.items():
            pts = [r for r in rows if r["fault"] == fault]
            ax.errorbar(
                [r["strength"] for r in pts],
                [max(r["rise"], 0.1) for r in pts],
                yerr=[r["fd_std"] / rows[0]["fd_std"] for r in pts],
                marker="o",
                ms=3,
                capsize=2,
                label=name,
            )
        ax.axhline(1.0, ls=":", lw=1, color="0.5")
        ax.set_yscale("log")
        ax.set_title(fault, fontsize=9)
        ax.set_xlabel("strength")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("(FD - FD clean) / spread of FD clean")
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    for name, (_, pr) in results.items():
        keys = list(pr)
        ax.plot(range(len(keys)), [pr[k]["recall"] for k in keys], "o-", ms=3, label=f"{name} recall")
        ax.plot(range(len(keys)), [pr[k]["precision"] for k in keys], "s--", ms=3, label=f"{name} precision")
    ax.set_xticks(range(len(keys)), keys, rotation=60, fontsize=7)
    ax.set_title("set faults", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("figures/metric_sensitivity.png"))
    args = p.parse_args()
    probe, reference = digits()
    results = {}
    for choice in ("digits", "digits-pooled"):
        net = feature_net(choice)
        results[f"{choice} ({net.dim}-d)"] = measure(net, probe, reference)
        rows, pr = results[f"{choice} ({net.dim}-d)"]
        for r in rows:
            print(
                f"{choice:14s} {r['fault']:8s} {r['strength']:<5g} FD {r['fd']:8.3f} ± {r['fd_std']:.3f}  "
                f"x{r['ratio']:.2f}  rise {r['rise']:.1f} spreads"
            )
        for k, v in pr.items():
            print(f"{choice:14s} {k:16s} precision {v['precision']:.3f}  recall {v['recall']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(results, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
