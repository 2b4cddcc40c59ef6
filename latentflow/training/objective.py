"""The training objective of one batch: noise, times and label dropout drawn from the step's
generator, then the conditional flow-matching loss of ``flow.py``, or its average-velocity
(MeanFlow) loss."""

from __future__ import annotations

from typing import Optional

import torch

from ..distributed import computes_in_low_precision, float32_forward
from ..flow import (
    broadcast_time,
    cfm_loss,
    interpolate,
    meanflow_loss,
    sample_time,
    sample_two_times,
    target_velocity,
)

__all__ = ["drop_labels", "forward_mode_attention", "gaps_open", "largest_gap", "training_loss"]


def drop_labels(labels: torch.Tensor, prob: float, null_label: int, generator: Optional[torch.Generator] = None):
    """Replace each label by ``null_label`` with probability ``prob`` (CFG training)."""
    if prob <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < prob
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def training_loss(
    model, x1, labels, flow, class_dropout: float, null_label: int, generator=None, *, cfg_scale=1.0, step=0
):
    """``(loss, t, error)`` for one batch of model-space latents, each (B,): the per-sample
    loss to minimise, the time each sample sits at, and its squared error (what the log
    shows; the loss itself for cfm). Noise, times and label dropout come from ``generator``.
    Shared by training and the benchmark.

    ``flow.objective`` picks the loss: CFM, or the average velocity (MeanFlow), for which
    ``cfg_scale`` is the guidance built into the target (unless ``flow.guidance_range`` makes
    it an input of the model, drawn per pair) and ``step`` paces the curriculum."""
    x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)  # (B, c, h, w) noise
    times = dict(
        scheme=flow.time_sampler,
        device=x1.device,
        generator=generator,
        logit_mean=flow.logit_mean,
        logit_std=flow.logit_std,
        t_max=flow.t_max,
    )
    if flow.objective == "meanflow":
        return _meanflow(model, x0, x1, labels, flow, class_dropout, null_label, generator, cfg_scale, step, times)
    t = sample_time(x1.shape[0], **times)  # (B,)
    y = drop_labels(labels, class_dropout, null_label, generator)
    loss = cfm_loss(model, x0, x1, t, flow.sigma_min, y=y)
    return loss, t, loss


def largest_gap(flow, step: int) -> float:
    """The widest t - r the MeanFlow schedule allows at ``step``: growing from 0 to 1 over
    ``flow.gap_warmup_steps`` once the ``flow.instant_steps`` of plain flow matching are done
    (during those, every pair has r = t whatever this says)."""
    opened = step - flow.instant_steps  # steps since the gaps opened
    return min(1.0, max(opened, 0) / flow.gap_warmup_steps) if flow.gap_warmup_steps else 1.0


def gaps_open(flow, step: int) -> bool:
    """Whether the schedule lets any pair at ``step`` have r < t: past the plain phase, and
    past the warm-up's first step, which opens the gaps at width 0."""
    return step >= flow.instant_steps and largest_gap(flow, step) > 0


def _meanflow(model, x0, x1, labels, flow, class_dropout, null_label, generator, cfg_scale, step, times):
    instant = step < flow.instant_steps  # plain flow matching first: every r = t
    max_gap = largest_gap(flow, step)
    jumps = dict(jump_share=flow.jump_share, jump_steps=flow.jump_steps)
    n = x1.shape[0]
    r, t = sample_two_times(n, 1.0 if instant else flow.equal_times, max_gap, **jumps, **times)  # (B,) each
    # no gap anywhere, decided by the step alone so that every rank and a resumed run agree:
    # the target is the velocity itself, and neither the tangent nor the derivative is needed
    gapless = not gaps_open(flow, step) or flow.equal_times >= 1
    y = drop_labels(labels, class_dropout, null_label, generator)
    v = target_velocity(x0, x1, flow.sigma_min)  # (B, c, h, w) the conditional velocity at r
    guided = y != null_label  # (B,)
    scale, inputs = cfg_scale, {}  # the guidance scale; as a model input, one per pair
    if flow.guidance_range is not None:  # drawn only when asked for: other runs keep their streams
        lo, hi = flow.guidance_range
        drawn = lo + (hi - lo) * torch.rand(n, device=x1.device, generator=generator)
        scale = torch.where(guided, drawn, torch.ones_like(drawn))  # (B,) a pair without label: 1
        inputs = {"guidance": scale}
    guide = (bool(inputs) or cfg_scale != 1) and bool(guided.any())
    own = None  # the network's instantaneous velocity at r, for improved MeanFlow's tangent
    tangent = flow.tangent == "model" and not gapless
    if guide or tangent:
        z = interpolate(x0, x1, r, flow.sigma_min)
        asked = [(y, scale)] if tangent else []
        asked += [(torch.full_like(y, null_label), 1.0)] if guide else []
        extra = {"guidance": torch.cat([torch.ones_like(r) * s for _, s in asked])} if inputs else {}
        with torch.no_grad():  # one pass over the batch once per label set asked for
            out = model(z.repeat(len(asked), 1, 1, 1), r.repeat(len(asked)), torch.cat([a for a, _ in asked]), **extra)
        out = out.to(v.dtype)
        if tangent:
            own = out[:n]
        if guide:
            # guidance folded into the target (MeanFlow, eq. 13): where a label is kept, move
            # with s * v + (1 - s) * v_uncond, the unconditional velocity from the network itself
            s = broadcast_time(scale, v) if inputs else scale
            v = torch.where(broadcast_time(guided, v), s * v + (1 - s) * out[-n:], v)

    def average(z, r_, t_):
        return model(z, r_, y, gap=t_ - r_, **inputs)

    difference = flow.derivative == "difference"
    options = dict(v=v, tangent=own, power=flow.loss_power, derivative=not gapless, difference=difference)
    if difference and computes_in_low_precision(model, x1.device.type):

        def exact(z, r_, t_):  # the difference's two ends, in float32
            with float32_forward(model, x1.device.type):
                return average(z.float(), r_, t_).float()

        options["exact"] = exact

    def loss_of():
        return meanflow_loss(average, x0, x1, r, t, flow.sigma_min, **options)

    # only forward-mode autodiff needs an attention kernel that supports it
    loss, error = loss_of() if gapless or difference else forward_mode_attention(loss_of, x1.device.type)
    return loss, r, error


_MATH_ATTENTION = set()  # device types whose fused attention kernel refused forward-mode AD


def forward_mode_attention(call, device_type: str):
    """Run ``call`` (a forward pass with forward-mode autodiff) with the fused attention kernel
    where it supports forward mode, else with PyTorch's composite attention, which does (the
    CPU's and the flash kernels do not, in torch 2.x). The choice is made on the first call,
    per device type, and kept."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device_type not in _MATH_ATTENTION:
        try:
            return call()
        except NotImplementedError as exc:
            if "forward AD" not in str(exc):
                raise
            _MATH_ATTENTION.add(device_type)
    with sdpa_kernel(SDPBackend.MATH):
        return call()
