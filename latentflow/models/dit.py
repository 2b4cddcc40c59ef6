"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers") as a flow-matching velocity field, built on timm's ``Attention``, ``Mlp`` and
``PatchEmbed``.

Conditioning is adaLN-Zero: time and label embeddings are summed into one vector ``c`` that
regresses per-block shift/scale/gate; the gates and the output layer start at zero, so the
untrained network predicts zero velocity and every block starts as the identity.

Labels ``0..num_classes-1`` are classes; ``num_classes`` is the null label used for
classifier-free guidance (and for unconditional models, ``num_classes = 0``, it is the only
label). ``forward(x, t, y=None)`` treats ``y=None`` as all-null.

``DiT`` is a diffusers ``ModelMixin`` + ``ConfigMixin``: ``save_pretrained`` writes its
constructor arguments and safetensors weights, ``from_pretrained`` rebuilds it.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention

from . import check_inputs, register

__all__ = ["DiT", "DIT_PRESETS", "sincos_pos_embed_2d", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of ``t`` (B,) -> (B, dim); frequencies as in "Attention Is All
    You Need", section 3.5."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (grid*grid, dim): half the channels encode the
    row, half the column (MAE, He et al. 2022)."""
    assert dim % 4 == 0, "position embedding needs hidden size divisible by 4"
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def encode(pos):  # (grid*grid,) -> (grid*grid, dim/2)
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, hidden). ``t`` is scaled by ``time_scale`` first so the sinusoid
    frequencies span the same range as for DiT's integer timesteps."""

    def __init__(self, hidden: int, freq_dim: int = 256, time_scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.time_scale = freq_dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t * self.time_scale, self.freq_dim).to(self.mlp[0].weight.dtype))


def _init_time_embedder(embedder: TimestepEmbedder) -> None:
    for layer in (embedder.mlp[0], embedder.mlp[2]):
        nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, N, D), c: (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)  # 6 x (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))  # (B, N, D)
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C)


class DiT(ModelMixin, ConfigMixin):
    """Velocity field on latents of ``in_channels`` x ``sample_size`` x ``sample_size``."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]  # the unit FSDP wraps and gradient checkpointing recomputes

    @register_to_config
    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 4,
        num_classes: int = 10,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        two_times: bool = False,
        guidance_range: Optional[List[float]] = None,
    ):
        super().__init__()
        check_inputs(two_times, guidance_range)
        if sample_size % patch_size:
            raise ValueError(
                f"patch size {patch_size} does not divide the latent size {sample_size}; "
                "pick a model preset with a smaller patch (e.g. /2) or a larger image size"
            )
        self.patch_size = patch_size
        self.null_label = num_classes  # the extra embedding row used for "no label"
        self.grid = sample_size // patch_size
        self.gradient_checkpointing = False
        self.fused_attention: Optional[bool] = None  # None: by device (see forward); the bench sets it

        self.x_embedder = PatchEmbed(sample_size, patch_size, in_channels, hidden_size, bias=True)
        # An average-velocity model is differentiated in time during training, and DiT's x1000
        # (integer timesteps) multiplies that derivative by up to 1000: its targets then grow
        # without bound (measured: the loss diverged within 5 epochs at 1000, fell at 1 and 10).
        # It embeds times at unit scale.
        time_scale = 1.0 if two_times else 1000.0
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.h_embedder = None
        self.initialize_weights()
        if two_times:
            # average-velocity models (flow.objective=meanflow) also see the gap to their end
            # time; built after the rest, so that every other weight draws what a flow-matching
            # model of the same seed draws
            self.h_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
            _init_time_embedder(self.h_embedder)
        self.w_embedder = None
        if guidance_range is not None:
            # guidance as an input (improved MeanFlow): the scale s, embedded as s - 1 so that
            # 0 is "unguided"; built last, for the same reason as the gap's
            self.w_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
            _init_time_embedder(self.w_embedder)

    def initialize_weights(self) -> None:
        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(xavier)
        w = self.x_embedder.proj.weight  # a conv that is a linear map on patches
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        _init_time_embedder(self.t_embedder)
        # adaLN-Zero: gates and output start at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        for layer in (self.final_layer.adaLN[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        gap: Optional[torch.Tensor] = None,
        guidance: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W) latents, t: (B,) times in [0, 1], y: (B,) labels or None; for a
        ``two_times`` model, gap: (B,) the span to the end time (None: 0, the instantaneous
        velocity); for a model built with a ``guidance_range``, guidance: (B,) the scale each
        sample is guided at (None: 1, unguided)."""
        if y is None:
            y = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D), N = (H/p)*(W/p)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        if self.h_embedder is not None:
            c = c + self.h_embedder(torch.zeros_like(t) if gap is None else gap)
        if self.w_embedder is not None:
            c = c + self.w_embedder(torch.zeros_like(t) if guidance is None else guidance - 1)
        # PyTorch's fused attention kernel off a CPU; on a CPU timm's composite attention, which
        # at these lengths trains 2x faster in bf16 (the fused kernel's backward is slow there),
        # equally fast in fp32, and has forward-mode rules (docs/performance.md)
        fused = x.device.type != "cpu" if self.fused_attention is None else self.fused_attention
        for block in self.blocks:
            block.attn.fused_attn = fused
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = self._gradient_checkpointing_func(block, h, c)  # recomputed in backward
            else:
                h = block(h, c)  # (B, N, D)
        h = self.final_layer(h, c)  # (B, N, p*p*C)
        return rearrange(
            h, "b (gh gw) (p q c) -> b c (gh p) (gw q)", gh=self.grid, p=self.patch_size, q=self.patch_size
        )  # (B, C, H, W)

    def flops_per_sample(self) -> int:
        """Forward FLOPs for one sample, counting 2 per multiply-add of every matrix product.

        With N tokens of width D, MLP width H, patch p, C latent channels, F frequency features:
        per block  3ND² (qkv) + ND² (proj) + 2NDH (MLP) + 2N²D (scores, mix) + 6D² (adaLN);
        once       NDp²C (patch embed) + FD + D² (time MLP) + 2D² + NDp²C (final adaLN, output).
        Norms, activations and softmax are left out (a few percent at most).
        """
        n, d = self.grid * self.grid, self.blocks[0].norm1.normalized_shape[0]
        h = self.blocks[0].mlp.fc1.out_features
        pc = self.patch_size**2 * self.config.in_channels
        block = 4 * n * d * d + 2 * n * d * h + 2 * n * n * d + 6 * d * d
        once = 2 * n * d * pc + self.t_embedder.freq_dim * d + d * d + 2 * d * d
        return 2 * (len(self.blocks) * block + once)


# name -> (depth, hidden, heads). S/B/L/XL as in DiT Table 1; the small ones train on a CPU.
DIT_PRESETS = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "Mini": (6, 256, 4),  # ~7 M parameters
    "Tiny": (4, 128, 4),  # ~1.3 M parameters: the embedded MNIST default (DiT-Tiny/2)
    "Nano": (2, 64, 2),  # tests and smoke runs
}


for _size, (_depth, _hidden, _heads) in DIT_PRESETS.items():
    for _patch in (1, 2, 4, 8):
        if _patch == 1 and _size not in ("Mini", "Tiny", "Nano"):
            continue  # patch 1 only for the small latents of small presets
        register(f"DiT-{_size}/{_patch}", DiT, patch_size=_patch, hidden_size=_hidden, depth=_depth, num_heads=_heads)
