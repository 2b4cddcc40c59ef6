"""The EMA of the weights: its warmed-up decay, the average itself, saving and loading."""

import pytest
import torch

from latentflow.ema import EMA


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_the_average_follows_the_warmed_up_decay():
    net = model()
    ema = EMA(net, decay=0.9)
    start = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)  # first update: d = min(0.9, 2 / 11)
    d = 2 / 11
    for e, s, p in zip(ema.model.parameters(), start, net.parameters()):
        torch.testing.assert_close(e, d * s + (1 - d) * p)
    for _ in range(200):  # long after warmup the decay is the configured one
        ema.update(net)
    d = min(0.9, (1 + ema.updates) / (10 + ema.updates))
    assert d == pytest.approx(0.9) and ema.updates == 201
    for e, p in zip(ema.model.parameters(), net.parameters()):
        torch.testing.assert_close(e, p)  # a constant model is its own average


def test_the_copy_is_frozen_and_separate():
    net = model()
    ema = EMA(net)
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training
    with torch.no_grad():
        net.weight.fill_(3.0)
    assert not torch.equal(ema.model.weight, net.weight)  # a copy, not a view


def test_state_round_trips_with_its_update_count():
    net = model()
    ema = EMA(net, 0.99)
    with torch.no_grad():
        net.weight.add_(1)
    ema.update(net)
    other = EMA(model(), 0.99)
    other.load_state_dict(ema.state_dict(), ema.updates)
    assert other.updates == 1 and torch.equal(other.model.weight, ema.model.weight)
    assert ema.materialize() is ema.model  # unsharded: nothing to gather
