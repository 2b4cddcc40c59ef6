"""latentflow: latent flow matching with a frozen pretrained VAE and a DiT velocity field.

Public API; the command line lives in ``latentflow.cli`` (``python main.py``).
"""

from .config import ExperimentConfig, load_config
from .errors import LatentflowError
from .flow import cfm_loss, interpolate, sample_time, target_velocity
from .models import MODELS, create_model
from .sampling import guided_velocity, sample_images
from .solvers import SOLVERS, integrate
from .vae import FrozenVAE

__all__ = [
    "ExperimentConfig",
    "FrozenVAE",
    "LatentflowError",
    "MODELS",
    "SOLVERS",
    "cfm_loss",
    "create_model",
    "guided_velocity",
    "integrate",
    "interpolate",
    "load_config",
    "sample_images",
    "sample_time",
    "target_velocity",
]
