"""What a training run is made of: where and how it runs (``RunOptions``), the counters that
change as it goes (``TrainState``, which a checkpoint stores), and the parts setup builds
for the loop (``Trainer``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..config import ExperimentConfig
from ..console import Console
from ..distributed import on_main
from ..errors import CheckpointError, TrainingDiverged

__all__ = ["TIME_BINS", "Interrupted", "RunOptions", "TrainState", "Trainer"]

TIME_BINS = 10  # equal-width bins of t for the loss-by-time statistics


@dataclass
class RunOptions:
    """Where and how to run; not part of the experiment (which says what to train)."""

    output_dir: Path = Path("runs")
    resume: Optional[str] = None  # 'latest', a run directory or a checkpoint directory
    mixed_precision: Optional[str] = None  # no | bf16 | fp16; None: a resumed run's, the launcher's, else auto
    cpu: bool = False
    cache_dir: Optional[Path] = None
    dist_timeout: float = 180.0  # seconds a collective may wait for a dead or stalled rank
    overrides: Sequence[str] = ()  # the --set overrides, which name the run
    argv: Optional[Sequence[str]] = None  # the command line, for the resume hint


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainState:
    """Counters and partial sums of a run: with the weights, optimizer and RNG states, all a
    checkpoint needs for the run to continue exactly where it was. The sums are over all
    ranks; on resume the main process carries them and the others start from zero."""

    epoch: int = 0  # epochs completed
    iteration: int = 0  # optimizer-step attempts made in the current epoch (skipped ones too)
    step: int = 0  # optimizer steps taken
    nonfinite_run: int = 0  # consecutive skipped steps
    nonfinite_total: int = 0
    loss_sum: float = 0.0  # this epoch so far (for the epoch mean)
    loss_count: int = 0
    bin_sum: List[float] = field(default_factory=lambda: [0.0] * TIME_BINS)
    bin_count: List[float] = field(default_factory=lambda: [0.0] * TIME_BINS)
    window_loss: float = 0.0  # this log interval so far
    window_grad: float = 0.0
    window_steps: int = 0
    best_val: float = float("inf")  # the lowest validation loss so far (data.val_fraction)
    best_epoch: int = 0
    log_bytes: int = 0  # length of log.jsonl when the checkpoint was written

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, values: dict, where: Path) -> TrainState:
        default = cls()
        for name in cls.__dataclass_fields__:
            if name not in values:
                raise CheckpointError(f"{where}: its train_state lacks {name}; use an earlier checkpoint")
            want = type(getattr(default, name))
            ok = isinstance(values[name], (int, float) if want is float else want) and not isinstance(
                values[name], bool
            )
            if not ok:
                raise CheckpointError(
                    f"{where}: train_state.{name} is {values[name]!r}, not a {want.__name__}; "
                    "the checkpoint is damaged, use an earlier one"
                )
        return cls(**{k: values[k] for k in cls.__dataclass_fields__})


@dataclass
class Trainer:
    """Everything setup builds and the loop uses, on one process."""

    cfg: ExperimentConfig
    options: RunOptions
    accelerator: object
    vae: object  # FrozenVAE
    model: torch.nn.Module  # as prepared (DDP-wrapped when distributed)
    raw_model: torch.nn.Module
    ema: object  # EMA
    optimizer: object
    batches: object  # LatentBatches
    rng: object  # RankRNG
    run_dir: Path
    facts: dict  # what the checkpoints record about the model and the data
    grid_labels: Optional[List[int]]
    stop: object  # StopRequest
    faults: object  # Faults
    checkpoints: object  # CheckpointManager
    console: Console  # how the main process tells the user (the command decides)
    evaluator: Optional[dict] = None  # the main process's feature net and references (train.eval_every)
    state: TrainState = field(default_factory=TrainState)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def interactive(self) -> bool:
        """Whether this process draws progress bars (the main one, on a terminal)."""
        return self.is_main and self.console.interactive

    def say(self, text: str) -> None:
        if self.is_main:
            self.console.line(text)

    def append_log(self, record: dict) -> None:
        """Append to log.jsonl (main process only; inside ``on_main``)."""
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def log(self, record: dict) -> None:
        """Append to log.jsonl; every rank calls it (a failure reaches all)."""
        on_main(self.accelerator, lambda: self.append_log(record))

    def diverged(self, what: str) -> TrainingDiverged:
        fp16 = self.accelerator.mixed_precision == "fp16"
        return TrainingDiverged(
            f"{what}; last good checkpoint: {self.checkpoints.last or 'none'}; lower train.lr"
            + (", or use --mixed-precision bf16 instead of fp16" if fp16 else " or train.grad_clip")
        )
