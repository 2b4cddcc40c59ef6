"""The digit net's feature space, checked against known degradations of real digits before
it is trusted: FD grows with every fault's strength, by more than its bootstrap spread, and
precision and recall tell a less diverse set from a less faithful one."""

import numpy as np
import pytest

from latentflow.config import DataConfig
from latentflow.data import build_dataset
from latentflow.evaluation import DigitNet, fd_with_spread, references_for_run
from latentflow.evaluation.degradations import DEGRADATIONS, drop_classes, duplicate
from latentflow.metrics import precision_recall


@pytest.fixture(scope="module")
def setting():
    """2 000 real bundled digits, the shipped net, and its MNIST test reference."""
    net = DigitNet()
    reference = references_for_run(DataConfig(), net, channels=1)[0]
    digits = build_dataset(DataConfig(max_items=2000), channels=1)
    return net, reference, digits.images.numpy().transpose(0, 2, 3, 1), digits.labels.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(DEGRADATIONS))
def test_fd_grows_with_every_fault_beyond_its_spread(setting, fault):
    net, reference, images, _ = setting
    fn, strengths = DEGRADATIONS[fault]
    points = [fd_with_spread(net.run(images)[0], reference["stats"], bootstrap=20)]
    for s in strengths:
        points.append(
            fd_with_spread(net.run(fn(images, s, np.random.default_rng(1)))[0], reference["stats"], bootstrap=20)
        )
    for (fd_a, std_a), (fd_b, std_b) in zip(points, points[1:]):
        assert fd_b - fd_a > 2 * (std_a + std_b), (fault, points)


def test_precision_and_recall_separate_diversity_from_fidelity(setting):
    net, reference, images, labels = setting
    real = reference["real"][:2000]
    clean = precision_recall(real, net.run(images)[0])
    rng = np.random.default_rng(2)
    for faulty in (drop_classes(images, labels, 5, rng)[0], duplicate(images, labels, 4, rng)[0]):
        pr = precision_recall(real, net.run(faulty)[0])
        assert pr["recall"] < clean["recall"] - 0.1  # fewer kinds of digit: less of the real set covered
        assert abs(pr["precision"] - clean["precision"]) < 0.05  # but each one as real as before
