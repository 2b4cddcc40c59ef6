"""Sampling: seeded noise -> (guided) velocity -> ODE solver -> unscale -> VAE decode.

``SamplerSettings.resolve`` is the one place where a sampler's settings are worked out:
what the caller asked for, the model's own settings for the rest, and the rule that a draw
without labels is unconditional (guidance scale 0). ``labels_for`` is the one reading of
"which classes": numbers, class names, ``all`` or ``none``. The pipeline, ``sample``,
``evaluate``, the per-epoch grid and evaluation during training all go through both.

Classifier-free guidance (Ho & Salimans 2022) is a thin wrapper around the velocity:
``v = v_uncond + s (v_cond - v_uncond)`` over all latent channels. ``s = 1`` is exactly
the conditional velocity and ``s = 0`` the unconditional one; both skip the second pass.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .config import MAX_SOLVER_STEPS, MIN_TOLERANCE, SamplerConfig
from .data import to_uint8
from .errors import LatentflowError, Stopped
from .solvers import SOLVERS, integrate
from .vae import FrozenVAE

__all__ = [
    "PIPELINE_NAMES",
    "SampleResult",
    "SamplerSettings",
    "guided_velocity",
    "jump_velocity",
    "labels_for",
    "sample_images",
    "to_uint8",
]

_DEFAULTS = SamplerConfig()  # the one place sampler defaults live
_INTERVAL = tuple(_DEFAULTS.guidance_interval) if _DEFAULTS.guidance_interval else None  # immutable, as a default

# What the pipeline's keywords call each setting; commands pass their flags' names instead,
# so that an error names what the caller typed.
PIPELINE_NAMES = {
    "solver": "solver",
    "steps": "num_inference_steps",
    "cfg_scale": "guidance_scale",
    "guidance_interval": "guidance_interval",
    "atol": "atol",
    "rtol": "rtol",
}


@dataclass(frozen=True)
class SamplerSettings:
    """How to integrate: the solver and its steps (or dopri5's tolerances), and guidance."""

    solver: str = _DEFAULTS.solver
    steps: int = _DEFAULTS.steps
    cfg_scale: float = _DEFAULTS.cfg_scale
    guidance_interval: Optional[Sequence[float]] = _INTERVAL
    atol: float = _DEFAULTS.atol
    rtol: float = _DEFAULTS.rtol
    objective: str = "cfm"  # what the model was trained for (not a choice): which solvers fit it
    guidance_range: Optional[List[float]] = None  # a meanflow model's learnt scales (not a choice)

    @classmethod
    def resolve(
        cls, defaults: SamplerSettings, *, conditional: bool = True, names: Optional[Dict[str, str]] = None, **asked
    ) -> SamplerSettings:
        """``defaults`` (a model's settings) with what the caller ``asked`` for on top (None:
        the default; an empty interval: guide the whole path), checked; without labels the
        scale is 0. An unusable value is one ``LatentflowError`` naming it as ``names`` does."""
        unknown = set(asked) - set(PIPELINE_NAMES)
        if unknown:
            raise TypeError(f"unknown sampler settings {sorted(unknown)}")
        chosen = {k: v for k, v in asked.items() if v is not None}
        if "guidance_interval" in chosen:
            interval = chosen["guidance_interval"]
            chosen["guidance_interval"] = (list(interval) or None) if isinstance(interval, (list, tuple)) else interval
        settings = replace(defaults, **chosen)
        names = {**PIPELINE_NAMES, **(names or {})}
        settings.check(names)
        scale, learnt = settings.cfg_scale, settings.guidance_range
        if settings.objective == "meanflow" and conditional and scale != 0:
            if learnt is None and scale != defaults.cfg_scale:
                raise LatentflowError(
                    f"{names['cfg_scale']} {scale!r}: this model was trained with guidance {defaults.cfg_scale:g} "
                    "built in (flow.objective=meanflow); leave it unset, or 0 for unconditional images"
                )
            if learnt is not None and not learnt[0] <= scale <= learnt[1]:
                raise LatentflowError(
                    f"{names['cfg_scale']} {scale!r}: this model learnt guidance scales from {learnt[0]:g} to "
                    f"{learnt[1]:g} (flow.guidance_range); choose one there, or 0 for unconditional images"
                )
        return settings if conditional else replace(settings, cfg_scale=0.0)

    def check(self, names: Dict[str, str] = PIPELINE_NAMES) -> None:
        def bad(key, must):
            value = getattr(self, key)
            return LatentflowError(f"{names[key]} {value!r}: {must}")

        if self.objective not in ("cfm", "meanflow"):
            raise LatentflowError(f"objective {self.objective!r}: not cfm or meanflow")
        if self.solver not in SOLVERS:
            raise bad("solver", f"not one of {', '.join(SOLVERS)}")
        if self.objective == "meanflow" and self.solver != "meanflow":
            raise bad(
                "solver",
                "this model was trained with flow.objective=meanflow to jump, not to be integrated; "
                "use meanflow with 1 or 2 steps",
            )
        if self.objective != "meanflow" and self.solver == "meanflow":
            raise bad(
                "solver",
                "meanflow jumps need a model trained with flow.objective=meanflow; "
                "use an ODE solver (euler, heun, ...)",
            )
        if self.objective == "meanflow" and self.guidance_interval is not None:
            raise bad("guidance_interval", "a meanflow model has its guidance built in; leave it unset")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_SOLVER_STEPS:
            raise bad("steps", f"must be an integer in [1, {MAX_SOLVER_STEPS}]")
        if not _number(self.cfg_scale) or self.cfg_scale < 0:
            raise bad("cfg_scale", "must be a finite number >= 0 (1 = no guidance)")
        for key in ("atol", "rtol"):
            if not _number(getattr(self, key)) or getattr(self, key) < MIN_TOLERANCE:
                raise bad(key, f"must be a finite number >= {MIN_TOLERANCE:g}")
        interval = self.guidance_interval
        if interval is not None and not (
            isinstance(interval, (list, tuple))
            and len(interval) == 2
            and all(_number(v) for v in interval)
            and 0.0 <= interval[0] < interval[1] <= 1.0
        ):
            raise bad("guidance_interval", "must be [t_lo, t_hi] with 0 <= t_lo < t_hi <= 1")

    @property
    def choices(self) -> Dict[str, object]:
        """The settings a caller chooses (the keywords of ``resolve``), as keywords."""
        return {k: getattr(self, k) for k in PIPELINE_NAMES}

    @property
    def tag(self) -> str:
        """A file-name tag: ``euler-8-cfg1.5`` (plus ``-int0.1-0.9`` with an interval)."""
        interval = self.guidance_interval
        return f"{self.solver}-{self.steps}-cfg{self.cfg_scale:g}" + (
            f"-int{interval[0]:g}-{interval[1]:g}" if interval else ""
        )


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


Labels = Union[None, int, str, Sequence[Union[int, str]]]


def labels_for(
    spec: Labels,
    num_images: Optional[int],
    num_classes: int,
    class_names: Optional[Sequence[str]] = None,
    name: str = "class_labels",
) -> Optional[List[int]]:
    """One label per image, or None for unconditional images.

    ``spec``: None or ``"none"`` (unconditional), ``"all"`` (the classes in turn; unconditional
    for a model without classes), a label, a class name, a list of them, or text such as
    ``"3"``, ``"0,1,2"`` or ``"circle,square"``; a list is cycled to ``num_images`` (default:
    its length). ``name`` is what the caller calls the argument, for the error message."""
    if spec is None or (isinstance(spec, str) and spec.strip() == "none"):
        return None
    if isinstance(spec, str) and spec.strip() == "all":
        return None if num_classes == 0 else [i % num_classes for i in range(num_images or num_classes)]
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    elif isinstance(spec, (int, np.integer)):
        spec = [spec]
    names = list(class_names or [])
    if num_classes == 0:
        raise LatentflowError(f"{name} {_show(spec)}: this model is unconditional; pass none for unconditional images")
    out = []
    for label in spec:
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            if label not in names:
                known = ", ".join(names) if names else f"none named; give numbers 0..{num_classes - 1}"
                raise LatentflowError(f"{name}: class {label!r} is not one of this model's classes ({known})")
            label = names.index(label)
        if not 0 <= int(label) < num_classes:
            raise LatentflowError(f"{name}: class label {label} is out of range 0..{num_classes - 1} for this model")
        out.append(int(label))
    if not out:
        raise LatentflowError(f"{name} is empty; pass none for unconditional images")
    n = num_images or len(out)
    return [out[i % len(out)] for i in range(n)]


def _show(spec) -> str:
    return ",".join(map(str, spec)) if isinstance(spec, (list, tuple)) else repr(spec)


def guided_velocity(
    model: nn.Module,
    labels: Optional[torch.Tensor],
    cfg_scale: float = 1.0,
    interval: Optional[Sequence[float]] = None,
) -> Callable:
    """velocity(x, t) of ``model`` for ``labels`` (None: unconditional) at guidance
    ``cfg_scale``, applied only while ``interval[0] <= t <= interval[1]`` if given."""
    null = getattr(model, "null_label", None)

    def unconditional(x, t):
        return model(x, t, None)

    if labels is None or cfg_scale == 0:
        return unconditional

    def conditional(x, t):
        return model(x, t, labels)

    if cfg_scale == 1:
        return conditional
    null_labels = torch.full_like(labels, null)

    def guided(x, t):
        if interval is not None and not bool(((t >= interval[0]) & (t <= interval[1])).all()):
            return model(x, t, labels)  # outside the guidance interval: plain conditional
        # one batched pass for both branches: (2B, C, H, W)
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null_labels]))
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    return guided


def jump_velocity(model: nn.Module, labels: Optional[torch.Tensor], cfg_scale: float = 1.0) -> Callable:
    """average(x, r, t) of an average-velocity model (flow.objective=meanflow) for ``labels``
    (None: unconditional). Its guidance was built in by training, at one scale, or over a
    range that the model takes as an input: then at ``cfg_scale``."""
    takes_scale = getattr(getattr(model, "config", None), "guidance_range", None) is not None
    inputs = {}
    if takes_scale and labels is not None:
        inputs = {"guidance": torch.full(labels.shape, float(cfg_scale), device=labels.device)}

    def average(x, r, t):
        return model(x, r, labels, gap=t - r, **inputs)

    return average


def _listening(velocity: Callable, stop: Callable[[], bool]) -> Callable:
    def checked(*args):
        if stop():
            raise Stopped("sampling stopped on request")
        return velocity(*args)

    return checked


@dataclass
class SampleResult:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,), -1 for unconditional
    nfe: int  # velocity evaluations per batch (each counts a guided pair once)
    latents: Optional[torch.Tensor] = None  # model-space x1 (N, c, h, w)
    trajectory: Optional[List[np.ndarray]] = None  # decoded x_t, uint8 (N, H, W, C) per time
    times: Optional[List[float]] = None
    settings: Optional[SamplerSettings] = None  # what the draw used, where it was resolved


@torch.no_grad()
def sample_images(
    model: nn.Module,
    vae: FrozenVAE,
    latent_shape: Sequence[int],
    labels: Optional[Sequence[int]] = None,
    num_samples: Optional[int] = None,
    *,
    solver: str = _DEFAULTS.solver,
    steps: int = _DEFAULTS.steps,
    cfg_scale: float = _DEFAULTS.cfg_scale,
    guidance_interval: Optional[Sequence[float]] = _INTERVAL,
    atol: float = _DEFAULTS.atol,
    rtol: float = _DEFAULTS.rtol,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 500,
    autocast: Optional[Callable[[], ContextManager]] = None,
    decode: bool = True,
    trajectory_times: int = 0,
    stop: Optional[Callable[[], bool]] = None,
) -> SampleResult:
    """Draw images. ``labels`` (one per sample) or ``num_samples`` unconditional ones.

    The noise comes from ``generator`` (a CPU generator), else one seeded with ``seed``, so
    the same seed gives the same samples on any device and in any batch size.
    ``trajectory_times > 0`` also decodes x_t at that many evenly spaced times (fixed-step
    solvers: at step boundaries) for the trajectory figure. ``stop`` is asked before every
    velocity evaluation; when it answers yes the draw raises ``Stopped``.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype  # a pipeline loaded in fp16 samples in fp16
    n = len(labels) if labels is not None else int(num_samples)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *latent_shape), generator=gen)  # (N, c, h, w)
    label_t = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
    autocast = autocast or contextlib.nullcontext
    images, latents, traj, times, nfe = [], [], [], None, 0
    model.eval()
    for start in range(0, n, batch_size):
        x0 = noise[start : start + batch_size].to(device, dtype)
        y = None if label_t is None else label_t[start : start + batch_size].to(device)
        if solver == "meanflow":  # guidance came with training: labels, or none for scale 0
            velocity = jump_velocity(model, None if cfg_scale == 0 else y, cfg_scale)
        else:
            velocity = guided_velocity(model, y, cfg_scale, guidance_interval)
        with autocast():
            result = integrate(
                velocity if stop is None else _listening(velocity, stop),
                x0,
                solver,
                steps,
                atol=atol,
                rtol=rtol,
                keep_trajectory=trajectory_times > 0,
            )
        nfe = max(nfe, result.nfe)
        x1 = result.x.float()  # (B, c, h, w)
        latents.append(x1.cpu())
        if decode:
            images.append(to_uint8(vae.decode(x1)))
        if trajectory_times > 0:
            pick = np.unique(np.linspace(0, len(result.trajectory) - 1, trajectory_times).round().astype(int))
            times = [result.times[i] for i in pick]
            traj.append([to_uint8(vae.decode(result.trajectory[i].float())) for i in pick])
    labels_np = np.full(n, -1, dtype=np.int64) if label_t is None else label_t.numpy()
    return SampleResult(
        images=np.concatenate(images) if decode else np.zeros((0,), np.uint8),
        labels=labels_np,
        nfe=nfe,
        latents=torch.cat(latents),
        trajectory=[np.concatenate([b[k] for b in traj]) for k in range(len(traj[0]))] if traj else None,
        times=times,
    )
