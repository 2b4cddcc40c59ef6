"""MAINTAINERS ONLY: regenerate an asset that latentflow ships in latentflow/assets/.

    python experiments/maintainer/regenerate_assets.py vae          # the MNIST AutoencoderKL (~15 min on 2 cores)
    python experiments/maintainer/regenerate_assets.py classifier   # the digit classifier evaluate uses

Replacing a shipped asset changes what every later run sees: a run trained with the old
VAE refuses to resume or sample from its checkpoints (their recorded VAE identity no longer
matches; its export/ carries its own copy and still works), and FD figures computed with
the old classifier are no longer comparable. Users train their own with
`python main.py train-vae` / `train-classifier`, which write under runs/.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from latentflow.commands.train_classifier import train_classifier
from latentflow.commands.train_vae import train_vae
from latentflow.evaluation.features import CLASSIFIER_DIR
from latentflow.training.vae import VAETrainArgs
from latentflow.vae import EMBEDDED_VAE


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("asset", choices=("vae", "classifier"), help="which shipped asset to regenerate")
    p.add_argument("--yes", action="store_true", help="confirm that the shipped asset is to be replaced")
    args = p.parse_args()
    if not args.yes:
        print(f"this replaces {EMBEDDED_VAE if args.asset == 'vae' else CLASSIFIER_DIR}; pass --yes to confirm")
        return 2
    if args.asset == "vae":
        train_vae(VAETrainArgs(out=str(EMBEDDED_VAE), overwrite=True, replace_shipped=True))
    else:
        train_classifier(CLASSIFIER_DIR, overwrite=True, replace_shipped=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
