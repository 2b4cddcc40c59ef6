"""Evaluation: how far samples are from real images, in a feature space that fits the data.

* ``features``: the feature nets (the shipped digit classifier, Inception where its weights
  are local) and the rule that picks one or refuses.
* ``fd``: reference statistics (``FDStats``), the Fréchet distance with its bootstrap spread,
  and FD at a matched sample size.
* ``references``: the statistics of a run's training data and held-out split, cached.
* ``report``: scoring a batch of samples against references (FD, floors, accuracy).

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

from .fd import FDStats, fd_with_spread, matched_fd
from .features import INCEPTION_WEIGHTS, DigitNet, InceptionNet, feature_net
from .references import dataset_features, describe_data, held_out, reference_for, references_for_run
from .report import evaluate_images, summary_line

__all__ = [
    "INCEPTION_WEIGHTS",
    "DigitNet",
    "FDStats",
    "InceptionNet",
    "dataset_features",
    "describe_data",
    "evaluate_images",
    "fd_with_spread",
    "feature_net",
    "held_out",
    "matched_fd",
    "reference_for",
    "references_for_run",
    "summary_line",
]
