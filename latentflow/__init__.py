"""latentflow: latent flow matching with a frozen pretrained VAE and a DiT velocity field.

The public Python API; the command line (``python main.py``) calls these same functions::

    from latentflow import LatentFlowPipeline, load_config, train

    run_dir = train(load_config("experiments/smoke.yaml"))          # train from Python
    pipe = LatentFlowPipeline.from_pretrained(run_dir / "export")   # generate
    images = pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0)).images
"""

from .config import ExperimentConfig, load_config
from .errors import LatentflowError
from .evaluate import evaluate_model
from .flow import cfm_loss, interpolate, sample_time, target_velocity
from .models import MODELS, create_model
from .pipeline import LatentFlowPipeline, export, generate, load_pipeline
from .reconstruct import reconstruction_check
from .sampling import guided_velocity, sample_images
from .solvers import SOLVERS, integrate
from .train import Runtime, train
from .vae import FrozenVAE

__all__ = [
    "ExperimentConfig",
    "FrozenVAE",
    "LatentFlowPipeline",
    "LatentflowError",
    "MODELS",
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
