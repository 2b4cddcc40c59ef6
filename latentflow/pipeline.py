"""``LatentFlowPipeline``: a trained velocity field and its VAE as a diffusers pipeline.

    from latentflow import LatentFlowPipeline
    pipe = LatentFlowPipeline.from_pretrained("runs/default-.../export")
    out = pipe(class_labels=[3, 7], num_inference_steps=8, guidance_scale=1.5,
               generator=torch.Generator().manual_seed(0))
    out.images  # PIL images

A pipeline directory holds ``model_index.json`` (the sampler settings and the latent
normalisation), ``transformer/`` (the EMA weights of the backbone, with its constructor
arguments) and ``vae/`` (the frozen AutoencoderKL), plus ``experiment.yaml`` and
``latentflow.json`` saying which run and step it came from. Training's ``export/`` is one;
``python main.py export`` makes one from any checkpoint.

``load_pipeline`` opens whatever a user points at (an export, a run directory, a checkpoint,
or an export of an earlier release) as a pipeline, so ``sample``, ``evaluate`` and
``export`` share one way in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import yaml
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from .checkpoint import Source, load_checkpoint, resolve_source
from .config import ExperimentConfig, config_from_file, config_to_dict
from .errors import CheckpointError, LatentflowError
from .models import create_model, model_from_config
from .runtime import atomic_dir
from .sampling import sample_images
from .vae import FrozenVAE, explain_load_error

__all__ = ["LatentFlowPipeline", "LatentFlowPipelineOutput", "load_pipeline", "pipeline_from_parts", "save_pipeline"]


@dataclass
class LatentFlowPipelineOutput(BaseOutput):
    """``images``: PIL images, or float arrays in [0, 1] of shape (N, H, W, C) for
    ``output_type="np"``, or model-space latents for ``"latent"``; ``labels``: the class of
    each image (-1: unconditional); ``nfe``: velocity evaluations per image batch."""

    images: Union[List, np.ndarray, torch.Tensor]
    labels: np.ndarray
    nfe: int


class LatentFlowPipeline(DiffusionPipeline):
    """Class-conditional (or unconditional) image generation by integrating a learned
    latent velocity field from noise (t = 0) to data (t = 1) and decoding with the VAE."""

    model_cpu_offload_seq = "transformer->vae"

    def __init__(
        self,
        transformer,
        vae,
        sigma_min: float = 1e-3,
        solver: str = "euler",
        num_inference_steps: int = 8,
        guidance_scale: float = 1.5,
        guidance_interval: Optional[List[float]] = None,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        latents_shift: Optional[List[float]] = None,
        latents_scale: Optional[List[float]] = None,
        class_names: Optional[List[str]] = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae)
        frozen = FrozenVAE(vae, "vae")
        shift, scale = frozen.normalization_lists()
        if latents_shift is not None and not np.allclose(latents_shift, shift, rtol=1e-5, atol=1e-6) or (
            latents_scale is not None and not np.allclose(latents_scale, scale, rtol=1e-5, atol=1e-6)
        ):
            raise CheckpointError(
                "model_index.json's latent normalisation differs from vae/config.json's "
                f"(shift {latents_shift}, scale {latents_scale}; the VAE's {shift}, {scale}); re-export it"
            )
        self.register_to_config(
            sigma_min=sigma_min, solver=solver, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_interval=guidance_interval, atol=atol, rtol=rtol,
            latents_shift=shift, latents_scale=scale, class_names=class_names,
        )

    # --- facts ------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_classes)

    @property
    def latent_shape(self):
        c = self.transformer.config
        return (int(c.in_channels), int(c.sample_size), int(c.sample_size))

    def frozen_vae(self) -> FrozenVAE:
        return FrozenVAE(self.vae, "vae")

    def _labels(self, class_labels, num_images: Optional[int]) -> Optional[List[int]]:
        if class_labels is None:
            return None
        if isinstance(class_labels, (int, str, np.integer)):
            class_labels = [class_labels]
        names = list(self.config.class_names or [])
        out = []
        for label in class_labels:
            if isinstance(label, str):
                if label not in names:
                    raise LatentflowError(f"class {label!r} is not one of this model's classes ({', '.join(names) or 'none named'})")
                label = names.index(label)
            if not 0 <= int(label) < self.num_classes:
                raise LatentflowError(f"class label {label} is out of range 0..{self.num_classes - 1} for this model")
            out.append(int(label))
        if not out:
            raise LatentflowError("class_labels is empty; pass None for unconditional images")
        n = num_images or len(out)
        return [out[i % len(out)] for i in range(n)]

    # --- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[Union[int, str, Sequence[Union[int, str]]]] = None,
        num_images: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        guidance_interval: Optional[Sequence[float]] = None,
        solver: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int = 500,
        atol: Optional[float] = None,
        rtol: Optional[float] = None,
    ):
        """Generate images.

        ``class_labels``: a label, a class name or a list of them, cycled to ``num_images``;
        None draws ``num_images`` (default 1) unconditional images. Unset sampler arguments
        come from the pipeline's config; ``guidance_interval=(0, 1)`` guides the whole path.
        ``generator`` (a CPU ``torch.Generator``) fixes the noise: the same seed gives the
        same images as ``python main.py sample --seed``.
        """
        from .solvers import SOLVERS

        c = self.config
        solver = solver or c.solver
        if solver not in SOLVERS:
            raise LatentflowError(f"solver {solver!r} is not one of {', '.join(SOLVERS)}")
        steps = int(num_inference_steps or c.num_inference_steps)
        scale = float(c.guidance_scale if guidance_scale is None else guidance_scale)
        if steps < 1 or not math.isfinite(scale) or scale < 0:
            raise LatentflowError(f"num_inference_steps must be >= 1 and guidance_scale >= 0 (got {steps}, {scale})")
        if output_type not in ("pil", "np", "latent"):
            raise LatentflowError(f"output_type {output_type!r}: choose 'pil', 'np' or 'latent'")
        labels = self._labels(class_labels, num_images)
        result = sample_images(
            self.transformer, self.frozen_vae(), self.latent_shape, labels, num_images or 1,
            solver=solver, steps=steps, cfg_scale=scale if labels is not None else 0.0,
            guidance_interval=guidance_interval if guidance_interval is not None else c.guidance_interval,
            atol=c.atol if atol is None else atol, rtol=c.rtol if rtol is None else rtol, generator=generator,
            batch_size=batch_size,
            decode=output_type != "latent",
        )
        if output_type == "latent":
            images = result.latents
        elif output_type == "np":
            images = result.images.astype(np.float32) / 255.0
        else:
            from PIL import Image

            images = [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in result.images]
        if not return_dict:
            return (images,)
        return LatentFlowPipelineOutput(images=images, labels=result.labels, nfe=result.nfe)


# --- building, saving and opening ---------------------------------------------------------------


def pipeline_from_parts(model, vae: FrozenVAE, cfg: ExperimentConfig, class_names=None) -> LatentFlowPipeline:
    """A pipeline of a backbone, a frozen VAE and the experiment's flow and sampler settings."""
    s = cfg.sampler
    return LatentFlowPipeline(
        transformer=model, vae=vae.autoencoder, sigma_min=cfg.flow.sigma_min, solver=s.solver,
        num_inference_steps=s.steps, guidance_scale=s.cfg_scale, guidance_interval=s.guidance_interval,
        atol=s.atol, rtol=s.rtol, class_names=list(class_names) if class_names else None,
    )


def save_pipeline(pipe: LatentFlowPipeline, out: Path, cfg: ExperimentConfig, info: dict) -> Path:
    """Write ``pipe`` to ``out`` atomically, with the experiment and where it came from."""
    out = Path(out)
    nbytes = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    nbytes += sum(p.numel() * p.element_size() for p in pipe.vae.parameters())
    with atomic_dir(out, "export", nbytes) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "experiment.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        (tmp / "latentflow.json").write_text(json.dumps({"format": 2, **info}, indent=2))
    return out


def _read_json(path: Path, fix: str = "the export is damaged") -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({str(exc).splitlines()[0][:80]}); {fix}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a JSON object; {fix}")
    return value


def _check_finite(model, where: Path) -> None:
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise CheckpointError(
            f"{where} holds non-finite weights (its training diverged); use an earlier checkpoint of the run"
        )


def _load_vae(cfg: ExperimentConfig, expected_identity: Optional[str], where: Path) -> FrozenVAE:
    vae = FrozenVAE.from_pretrained(cfg.vae.pretrained, cfg.vae.subfolder)
    if expected_identity and not vae.same_weights_as(expected_identity):
        raise CheckpointError(
            f"{where} was trained with VAE {expected_identity} but {cfg.vae.pretrained} is now {vae.identity}; "
            "restore that VAE, or sample from the run's export/, which carries its own"
        )
    return vae


def _run_config(run_dir: Optional[Path], where: Path) -> ExperimentConfig:
    path = (run_dir / "config.yaml") if run_dir else None
    if path is None or not path.is_file():
        raise CheckpointError(f"{where}: its run's config.yaml is missing; pass the run directory or its export/")
    return config_from_file(path, "run config")


def _from_checkpoint(src: Source) -> tuple:
    ckpt = load_checkpoint(src.path, parts=("ema",))
    state = ckpt["state"]
    cfg = _run_config(src.run_dir, src.path)
    try:
        model = model_from_config(state["model"]["class"], state["model"]["config"])
        model.load_state_dict(ckpt["ema"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{src.path}: its weights do not fit its recorded model ({explain_load_error(exc)}); "
                              "the checkpoint is damaged, use an earlier one") from None
    _check_finite(model, src.path)
    vae = _load_vae(cfg, state["vae"].get("identity"), src.path)
    info = {"run": str(src.run_dir), "checkpoint": str(src.path), "step": state["step"], "epoch": state["epoch"]}
    return pipeline_from_parts(model, vae, cfg, state.get("class_names")), cfg, info


def _from_legacy_export(src: Source) -> tuple:
    """An export of format 1: EMA weights, config.yaml and export.json."""
    from safetensors.torch import load_file

    info = _read_json(src.path / "export.json")
    cfg = config_from_file(src.path / "config.yaml", "export config")
    vae = _load_vae(cfg, info.get("vae_identity"), src.path)
    c, h, _ = info.get("latent_shape") or vae.latent_shape(cfg.data.image_size)
    model = create_model(cfg.model.name, sample_size=h, in_channels=c, num_classes=info.get("num_classes", 10))
    try:
        model.load_state_dict(load_file(str(src.path / "model.safetensors")))
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"{src.path}: weights do not fit {cfg.model.name} ({explain_load_error(exc)})") from None
    _check_finite(model, src.path)
    return pipeline_from_parts(model, vae, cfg), cfg, {"run": str(src.run_dir), "step": info.get("step"),
                                                      "epoch": info.get("epoch"), "converted_from": "format 1"}


def load_pipeline(path: Path, device=None, flag: str = "--checkpoint", with_info: bool = False):
    """Open an export, a run directory or a checkpoint as a ``LatentFlowPipeline``
    (on ``device``); with ``with_info`` also return (experiment config, provenance)."""
    src = resolve_source(Path(path), flag)
    if src.kind == "export":
        from diffusers.utils import logging as dlogging

        dlogging.disable_progress_bar()
        fix = "re-export it with `python main.py export --checkpoint RUN --out DIR`"
        _read_json(src.path / "model_index.json", fix)
        try:
            pipe = LatentFlowPipeline.from_pretrained(src.path)
        except LatentflowError as exc:
            raise CheckpointError(f"{src.path}: {exc}") from None
        except Exception as exc:  # diffusers' loaders raise OSError, ValueError, RuntimeError, ...
            raise CheckpointError(f"{src.path} cannot be loaded: {explain_load_error(exc)}; {fix}") from None
        _check_finite(pipe.transformer, src.path)
        cfg_file, info_file = src.path / "experiment.yaml", src.path / "latentflow.json"
        cfg = config_from_file(cfg_file, "export's experiment") if cfg_file.is_file() else None
        info = _read_json(info_file, fix) if info_file.is_file() else {}
    elif src.kind == "checkpoint":
        pipe, cfg, info = _from_checkpoint(src)
    else:
        pipe, cfg, info = _from_legacy_export(src)
    if device is not None:
        pipe.to(device)
    pipe.transformer.eval()
    return (pipe, cfg, info) if with_info else pipe


# --- the commands: export and sample ------------------------------------------------------------


def export(source: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the pipeline of any complete checkpoint, run or export to ``out``."""
    out, source = Path(out), Path(source)
    if out.exists() and not overwrite:
        raise LatentflowError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not (out / "model_index.json").is_file():
        raise LatentflowError(f"--out {out} exists and is not a pipeline directory; --overwrite only replaces an "
                              "earlier export: choose another --out")
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise LatentflowError(f"--out {out} holds the source {source}; choose another --out")
    pipe, cfg, info = load_pipeline(source, with_info=True)
    if cfg is None:
        raise CheckpointError(f"{source} has no experiment.yaml; it cannot be re-exported")
    return save_pipeline(pipe, out, cfg, {**info, "exported_from": str(source)})


def parse_labels(text: Optional[str], num_samples: int, num_classes: int) -> Optional[List[int]]:
    """'3' -> every sample a 3; '0,1,2' -> cycled; 'all' (or None) -> classes in turn when the
    model is conditional, unconditional otherwise; 'none' -> unconditional."""
    if text is None or text == "all":
        return None if num_classes == 0 else [i % num_classes for i in range(num_samples)]
    if text == "none":
        return None
    try:
        chosen = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LatentflowError(f"--labels {text!r}: expected integers like 3 or 0,1,2, or 'all'/'none'") from None
    bad = [v for v in chosen if not 0 <= v < num_classes]
    if not chosen or bad:
        raise LatentflowError(
            f"--labels {text!r}: this model has {num_classes} classes (0..{num_classes - 1})" if num_classes
            else f"--labels {text!r}: this model is unconditional; use --labels none"
        )
    return [chosen[i % len(chosen)] for i in range(num_samples)]


def default_output(source: Path, kind: str, name: str) -> Path:
    """Where a command writes when not told: ``RUN/<kind>/<name>`` for a run's model,
    else ``runs/<kind>-<timestamp>/<name>``; never the current directory."""
    from .checkpoint import new_run_dir

    src = resolve_source(Path(source))
    if src.run_dir is not None:
        return src.run_dir / kind / name
    return new_run_dir(Path("runs"), kind) / name


def generate(
    source: Path,
    out: Optional[Path] = None,
    *,
    labels: Optional[str] = None,
    num_samples: int = 100,
    seed: int = 0,
    solver: Optional[str] = None,
    steps: Optional[int] = None,
    cfg_scale: Optional[float] = None,
    batch_size: int = 500,
    ncol: Optional[int] = None,
    overwrite: bool = False,
    device=None,
    trajectory: int = 0,
) -> dict:
    """``python main.py sample``: draw from any model source and write ``OUT.png`` (a grid)
    and ``OUT.npz`` (``images`` uint8 [N, H, W, C], ``labels``, -1 for unconditional); with
    ``trajectory`` also ``OUT_trajectory.png``, x_t decoded at that many times, one row per
    sample. Returns what was done."""
    import time

    from .figures import save_grid

    pipe, cfg, _ = load_pipeline(source, device, with_info=True)
    c = pipe.config
    solver, steps = solver or c.solver, steps or c.num_inference_steps
    scale = c.guidance_scale if cfg_scale is None else cfg_scale
    if not math.isfinite(scale) or scale < 0:
        raise LatentflowError(f"--cfg-scale {scale}: must be a finite number >= 0 (1 = no guidance)")
    chosen = parse_labels(labels, num_samples, pipe.num_classes)
    if out is None:
        out = default_output(source, "samples", f"{solver}-{steps}-cfg{scale:g}-n{num_samples}-seed{seed}.png")
    out = Path(out)
    if out.suffix not in (".png", ".npz"):
        raise LatentflowError(f"--out {out}: give a .png (grid) or .npz (arrays) path; both are written")
    png, npz = out.with_suffix(".png"), out.with_suffix(".npz")
    existing = [str(p) for p in (png, npz) if p.exists()]
    if existing and not overwrite:
        raise LatentflowError(f"{', '.join(existing)} already exist; choose another --out or pass --overwrite")
    if out.parent.exists() and not out.parent.is_dir():
        raise LatentflowError(f"--out {out}: {out.parent} is a file, not a directory")
    start = time.perf_counter()
    result = sample_images(
        pipe.transformer, pipe.frozen_vae(), pipe.latent_shape, chosen, num_samples, solver=solver, steps=steps,
        cfg_scale=scale if chosen is not None else 0.0, guidance_interval=c.guidance_interval, atol=c.atol,
        rtol=c.rtol, generator=torch.Generator().manual_seed(seed), batch_size=batch_size, trajectory_times=trajectory,
    )
    seconds = time.perf_counter() - start
    from .runtime import atomic_file

    with atomic_file(npz, "samples") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=result.images, labels=result.labels)
    with atomic_file(png, "sample grid") as tmp:
        save_grid(result.images, tmp, ncol=ncol or min(10, num_samples), format="png")
    written = [png, npz]
    if trajectory:
        from .figures import save_trajectory

        path = out.with_name(out.stem + "_trajectory.png")
        with atomic_file(path, "trajectory figure") as tmp:
            save_trajectory(result.trajectory, result.times, tmp, max_rows=min(num_samples, 10))
        written.append(path)
    return {"png": png, "npz": npz, "written": written, "solver": solver, "steps": steps, "nfe": result.nfe,
            "cfg_scale": scale if chosen is not None else 0.0, "seed": seed, "num_samples": num_samples,
            "seconds": seconds}
