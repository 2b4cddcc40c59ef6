"""Experiment trackers (TensorBoard, wandb) through Accelerate."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Optional

from ..errors import LatentflowError

__all__ = ["log_image", "start_trackers", "tracker_for"]

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def tracker_for(name: str) -> Optional[str]:
    """The Accelerate ``log_with`` value for ``train.log_with``, refusing a missing package."""
    if name == "none":
        return None
    package = TRACKER_PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise LatentflowError(
            f"train.log_with is {name!r} but the {package} package is not installed; `pip install {package}`, "
            "or set train.log_with to another tracker or 'none'"
        )
    return name


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def start_trackers(accelerator, run_dir: Path, config: dict, resume_step: Optional[int]) -> None:
    """Point the trackers at ``run_dir`` (TensorBoard writes ``run_dir/tensorboard``) and
    start them; on a resume, TensorBoard drops the events logged after the checkpoint."""
    if not accelerator.log_with:
        return
    accelerator.project_configuration.set_directories(str(run_dir))
    accelerator.project_configuration.logging_dir = str(run_dir)
    run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]  # a resume continues the wandb run
    kwargs = {"wandb": {"name": run_dir.name, "dir": str(run_dir), "id": run_id, "resume": "allow"}}
    if resume_step is not None:
        kwargs["tensorboard"] = {"purge_step": resume_step + 1}
    # TensorBoard writes into logging_dir/<project name>; wandb files the run under a project
    project = "tensorboard" if "tensorboard" in map(str, accelerator.log_with) else "latentflow"
    accelerator.init_trackers(project, _flatten(config), kwargs)


def log_image(accelerator, name: str, image, step: int) -> None:
    """An HWC uint8 image to every tracker (main process only, as Accelerate's own log)."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({name: [image]}, step=step)
