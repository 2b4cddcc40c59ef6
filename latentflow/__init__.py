"""latentflow: latent flow matching with a frozen pretrained VAE and a DiT velocity field.

The public Python API; the command line (``python main.py``) calls these same functions::

    from latentflow import LatentFlowPipeline, load_config, train

    run_dir = train(load_config("smoke"))                            # train from Python
    pipe = LatentFlowPipeline.from_pretrained(run_dir / "export")   # generate
    images = pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0)).images

Names are imported on first use, so ``import latentflow`` (and ``--help``) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_API = {
    "ExperimentConfig": "config",
    "load_config": "config",
    "LatentflowError": "errors",
    "FrozenVAE": "vae",
    "MODELS": "models",
    "create_model": "models",
    "SOLVERS": "solvers",
    "integrate": "solvers",
    "cfm_loss": "flow",
    "interpolate": "flow",
    "sample_time": "flow",
    "target_velocity": "flow",
    "guided_velocity": "sampling",
    "sample_images": "sampling",
    "LatentFlowPipeline": "pipeline",
    "load_pipeline": "pipeline",
    "RunOptions": "training.state",
    "Runtime": "commands.train",
    "train": "commands.train",
    "generate": "commands.sample",
    "evaluate_model": "commands.evaluate",
    "export": "commands.export",
    "reconstruction_check": "commands.reconstruct",
}

__all__ = [
    "ExperimentConfig",
    "FrozenVAE",
    "LatentFlowPipeline",
    "LatentflowError",
    "MODELS",
    "RunOptions",
    "Runtime",
    "SOLVERS",
    "cfm_loss",
    "create_model",
    "evaluate_model",
    "export",
    "generate",
    "guided_velocity",
    "integrate",
    "interpolate",
    "load_config",
    "load_pipeline",
    "reconstruction_check",
    "sample_images",
    "sample_time",
    "target_velocity",
    "train",
]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'latentflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for editors and type checkers
    from .commands.evaluate import evaluate_model
    from .commands.export import export
    from .commands.reconstruct import reconstruction_check
    from .commands.sample import generate
    from .commands.train import Runtime, train
    from .config import ExperimentConfig, load_config
    from .errors import LatentflowError
    from .flow import cfm_loss, interpolate, sample_time, target_velocity
    from .models import MODELS, create_model
    from .pipeline import LatentFlowPipeline, load_pipeline
    from .sampling import guided_velocity, sample_images
    from .solvers import SOLVERS, integrate
    from .training.state import RunOptions
    from .vae import FrozenVAE
