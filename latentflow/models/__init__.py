"""Backbone registry: a backbone registers each of its presets by name, and an experiment's
``model.name`` picks one. The CLI's choices come from this table, so adding a size or a new
backbone is one ``register`` call.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn

__all__ = ["MODELS", "create_model", "register"]

MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register(name: str, builder: Callable[..., nn.Module]) -> None:
    if name in MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    MODELS[name] = builder


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with data-dependent ``kwargs`` (input_size,
    in_channels, num_classes)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


from . import dit  # noqa: E402,F401  (registers the DiT presets)
