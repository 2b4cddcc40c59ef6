"""A UNet velocity field: diffusers' ``UNet2DModel`` behind latentflow's contract.

``forward(x, t, y=None)`` as for the DiT: latents (B, C, H, W), times (B,) in [0, 1] (scaled
by 1000 for the sinusoidal embedding, as DiT's integer timesteps), labels (B,) or None.
Labels enter through the UNet's class embedding (``num_class_embeds``, summed with the time
embedding); row ``num_classes`` is the null label of classifier-free guidance, and ``None``
means all-null. The output convolution starts at zero, so the untrained network predicts zero
velocity, as the DiT's adaLN-Zero does.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config

from . import check_inputs, register

__all__ = ["UNet", "UNET_PRESETS"]


class UNet(ModelMixin, ConfigMixin):
    """Velocity field on latents of ``in_channels`` x ``sample_size`` x ``sample_size``."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 4,
        num_classes: int = 10,
        block_out_channels: Sequence[int] = (64, 128),
        layers_per_block: int = 2,
        attention_levels: Sequence[bool] = (False, True),
        attention_head_dim: int = 32,
        two_times: bool = False,
        guidance_range: Optional[List[float]] = None,
    ):
        super().__init__()
        check_inputs(two_times, guidance_range)
        levels = len(block_out_channels)
        if sample_size % 2 ** (levels - 1):
            raise ValueError(
                f"{levels} UNet levels halve the latent size {levels - 1} times, which does not divide "
                f"{sample_size}; pick a preset with fewer levels or a larger image size"
            )
        self.null_label = num_classes
        down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels]
        up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)]
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            attention_head_dim=attention_head_dim,
            norm_num_groups=min(32, min(block_out_channels) // 4),
            num_class_embeds=num_classes + 1,
        )
        nn.init.zeros_(self.unet.conv_out.weight)  # zero velocity at the start
        nn.init.zeros_(self.unet.conv_out.bias)
        if two_times:  # average-velocity models: the gap (and the scale) join the label's embedding
            embedding = _LabelAndGap(self.unet.class_embedding, block_out_channels[0], guidance_range is not None)
            self.unet.class_embedding = embedding

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        gap: Optional[torch.Tensor] = None,
        guidance: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W) latents, t: (B,) times in [0, 1], y: (B,) labels or None; for a
        ``two_times`` model, gap: (B,) the span to the end time (None: 0); for a model built
        with a ``guidance_range``, guidance: (B,) each sample's scale (None: 1, unguided)."""
        if y is None:
            y = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        if not isinstance(self.unet.class_embedding, _LabelAndGap):
            return self.unet(x, t * 1000.0, class_labels=y).sample  # (B, C, H, W)
        # an average-velocity model: times at unit scale (see the DiT), the gap beside the label
        self.unet.class_embedding.gap = torch.zeros_like(t) if gap is None else gap
        self.unet.class_embedding.guidance = torch.zeros_like(t) if guidance is None else guidance - 1
        return self.unet(x, t, class_labels=y).sample


class _LabelAndGap(nn.Module):
    """The UNet's class embedding plus an embedding of the gap ``t - r`` (sinusoidal features,
    then an MLP, as the UNet embeds its time), and with ``guided`` one of the guidance scale
    less 1 (0: unguided). ``UNet.forward`` sets ``gap`` and ``guidance`` before each call,
    since ``UNet2DModel`` passes only the labels through."""

    def __init__(self, labels: nn.Embedding, channels: int, guided: bool = False):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.labels = labels
        self.features = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(channels, labels.embedding_dim)
        self.gap: Optional[torch.Tensor] = None
        self.scale_mlp = TimestepEmbedding(channels, labels.embedding_dim) if guided else None
        self.guidance: Optional[torch.Tensor] = None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp.linear_1.weight.dtype
        out = self.labels(y) + self.mlp(self.features(self.gap).to(dtype))
        if self.scale_mlp is not None:
            out = out + self.scale_mlp(self.features(self.guidance).to(dtype))
        return out


# name -> (block_out_channels, layers_per_block, attention at each level). Two levels fit the
# 8x8 latents of the embedded default; the L preset's three levels need a side divisible by 4.
UNET_PRESETS = {
    "S": ((64, 128), 1, (False, True)),
    "B": ((128, 256), 2, (False, True)),
    "L": ((128, 256, 512), 2, (False, True, True)),
}

for _size, (_channels, _layers, _attention) in UNET_PRESETS.items():
    register(f"UNet-{_size}", UNet, block_out_channels=_channels, layers_per_block=_layers, attention_levels=_attention)
