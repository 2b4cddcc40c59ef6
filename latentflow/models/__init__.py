"""Backbone registry. A preset is a name for a backbone class plus constructor arguments;
an experiment's ``model.name`` picks one, and the config's choices come from this table, so
adding a size or a backbone is one ``register`` call.

Every backbone is a diffusers ``ModelMixin`` + ``ConfigMixin`` with the same contract,
``forward(x, t, y=None, gap=None, guidance=None)``: latents (B, C, H, W), times (B,) in
[0, 1], labels (B,) or None; for models built with ``two_times`` the gap (B,) to an end time,
and for those built with a ``guidance_range`` the guidance scale (B,) as an input; and a
``null_label`` attribute for classifier-free guidance. Its config records everything needed
to rebuild it, so checkpoints and exports describe themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type

import torch.nn as nn

__all__ = ["MODELS", "MODEL_CLASSES", "Preset", "check_inputs", "create_model", "model_from_config", "register"]


@dataclass(frozen=True)
class Preset:
    cls: Type[nn.Module]
    kwargs: Dict[str, Any] = field(default_factory=dict)


MODELS: Dict[str, Preset] = {}
MODEL_CLASSES: Dict[str, Type[nn.Module]] = {}


def register(name: str, cls: Type[nn.Module], **kwargs) -> None:
    """Register preset ``name``: ``cls(**kwargs, **data_kwargs)``."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    MODELS[name] = Preset(cls, dict(kwargs))
    MODEL_CLASSES.setdefault(cls.__name__, cls)


def create_model(
    name: str,
    *,
    sample_size: int,
    in_channels: int,
    num_classes: int,
    two_times: bool = False,
    guidance_range: Optional[List[float]] = None,
) -> nn.Module:
    """Build preset ``name`` for latents of ``in_channels`` x ``sample_size`` x ``sample_size``
    and ``num_classes`` classes (0: unconditional); ``two_times`` adds the second time input
    (the gap to the end time) that average-velocity models take, and ``guidance_range``
    ``[lo, hi]`` the guidance scale as a third input, learnt over that range."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(MODELS)}")
    preset = MODELS[name]
    extra = {"two_times": True} if two_times else {}
    if guidance_range is not None:
        extra["guidance_range"] = [float(v) for v in guidance_range]
    return preset.cls(
        sample_size=sample_size, in_channels=in_channels, num_classes=num_classes, **preset.kwargs, **extra
    )


def check_inputs(two_times: bool, guidance_range: Optional[List[float]]) -> None:
    """A backbone's extra inputs: guidance as an input belongs to average-velocity models,
    whose guidance is otherwise a training constant."""
    if guidance_range is None:
        return
    if not two_times:
        raise ValueError("guidance_range is for average-velocity models (two_times=True)")
    if len(guidance_range) != 2 or not 0 <= guidance_range[0] < guidance_range[1]:
        raise ValueError(f"guidance_range must be [lo, hi] with 0 <= lo < hi, got {list(guidance_range)}")


def model_from_config(class_name: str, config: Dict[str, Any]) -> nn.Module:
    """Rebuild a backbone from the class name and config a checkpoint recorded."""
    if class_name not in MODEL_CLASSES:
        raise KeyError(f"unknown backbone class {class_name!r}; known: {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[class_name].from_config(config)


from . import dit, unet  # noqa: E402,F401  (register the DiT and UNet presets)
