"""``LatentFlowPipeline``: a trained velocity field and its VAE as a diffusers pipeline.

    from latentflow import LatentFlowPipeline
    pipe = LatentFlowPipeline.from_pretrained("runs/default-.../export")
    out = pipe(class_labels=[3, 7], num_inference_steps=4, guidance_scale=2.0,
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

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from .bounded import BoundsError, physical_memory, read_json
from .config import ExperimentConfig, config_from_file, save_config
from .errors import CheckpointError, LatentflowError
from .files import atomic_dir, file_sha256
from .models import MODEL_CLASSES, create_model, model_from_config
from .runs import Source, load_checkpoint, resolve_source
from .sampling import PIPELINE_NAMES, SampleResult, SamplerSettings, labels_for, sample_images
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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A pipeline directory is read by latentflow itself: the backbone class comes from
        latentflow's registry and the weights must be safetensors, so an export never runs
        code of its own (its ``latentflow_pipeline.py`` is for plain diffusers). Anything
        else (a Hub id) goes through diffusers' loader."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir() and (path / "model_index.json").is_file():
            return _read_pipeline_dir(cls, path, kwargs.pop("torch_dtype", None))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

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
        objective: str = "cfm",
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae)
        frozen = FrozenVAE(vae, "vae")
        shift, scale = frozen.normalization_lists()
        if (
            latents_shift is not None
            and not np.allclose(latents_shift, shift, rtol=1e-5, atol=1e-6)
            or (latents_scale is not None and not np.allclose(latents_scale, scale, rtol=1e-5, atol=1e-6))
        ):
            raise CheckpointError(
                "model_index.json's latent normalisation differs from vae/config.json's "
                f"(shift {latents_shift}, scale {latents_scale}; the VAE's {shift}, {scale}); re-export it"
            )
        self.register_to_config(
            sigma_min=sigma_min,
            solver=solver,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            atol=atol,
            rtol=rtol,
            latents_shift=shift,
            latents_scale=scale,
            class_names=class_names,
            objective=objective,
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

    @property
    def sampler_settings(self) -> SamplerSettings:
        """The sampler settings this pipeline was saved with (its defaults)."""
        c = self.config
        return SamplerSettings(
            solver=c.solver,
            steps=int(c.num_inference_steps),
            cfg_scale=float(c.guidance_scale),
            guidance_interval=list(c.guidance_interval) if c.guidance_interval else None,
            atol=c.atol,
            rtol=c.rtol,
            objective=c.get("objective", "cfm"),  # exports made before average velocities: cfm
            guidance_range=self.transformer.config.get("guidance_range"),
        )

    def _check_count(self, n: Optional[int], name: str) -> None:
        """Refuse a draw whose noise, latents and images would not fit in half this machine's
        memory, before anything is allocated."""
        if n is None:
            return
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LatentflowError(f"{name} {n!r}: give a whole number >= 1")
        c, h, w = self.latent_shape
        side = h * 2 ** (len(self.vae.config.block_out_channels) - 1)
        per_image = 3 * 4 * c * h * w + side * side * int(self.vae.config.in_channels) + 8
        memory = physical_memory()
        if memory and n * per_image > memory / 2:
            raise LatentflowError(
                f"{name} {n}: that many images need about {n * per_image / 2**30:.1f} GB, more than half of this "
                f"machine's {memory / 2**30:.0f} GB; draw at most {int(memory / 2 / per_image)} at a time "
                "(with another seed for the next)"
            )

    # --- generation -------------------------------------------------------------------------

    def resolve(
        self, class_labels=None, num_images: Optional[int] = None, names: Optional[Dict[str, str]] = None, **sampler
    ) -> Tuple[Optional[List[int]], SamplerSettings]:
        """The labels (one per image, or None) and the sampler settings a draw would use:
        labels as ``labels_for`` reads them, settings resolved against this pipeline's own by
        ``SamplerSettings.resolve``. ``names`` says what the caller calls each setting."""
        self._check_count(num_images, (names or {}).get("num_images", "num_images"))
        labels = labels_for(
            class_labels,
            num_images,
            self.num_classes,
            self.config.class_names,
            (names or {}).get("labels", "class_labels"),
        )
        settings = SamplerSettings.resolve(
            self.sampler_settings, conditional=labels is not None, names=names, **sampler
        )
        return labels, settings

    @torch.no_grad()
    def draw(
        self,
        class_labels=None,
        num_images: Optional[int] = None,
        *,
        generator: Optional[torch.Generator] = None,
        batch_size: int = 500,
        decode: bool = True,
        trajectory_times: int = 0,
        names: Optional[Dict[str, str]] = None,
        stop=None,
        **sampler,
    ) -> SampleResult:
        """The one way latentflow samples a trained model (``__call__``, ``sample``,
        ``evaluate``, the training grid and evaluation during training): ``resolve``, then
        ``sample_images``. Returns uint8 images, latents, labels, NFE and the settings used."""
        labels, settings = self.resolve(class_labels, num_images, names, **sampler)
        result = sample_images(
            self.transformer,
            self.frozen_vae(),
            self.latent_shape,
            labels,
            num_images or 1,
            solver=settings.solver,
            steps=settings.steps,
            cfg_scale=settings.cfg_scale,
            guidance_interval=settings.guidance_interval,
            atol=settings.atol,
            rtol=settings.rtol,
            generator=generator,
            batch_size=batch_size,
            decode=decode,
            trajectory_times=trajectory_times,
            stop=stop,
        )
        result.settings = settings
        return result

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
        if output_type not in ("pil", "np", "latent"):
            raise LatentflowError(f"output_type {output_type!r}: choose 'pil', 'np' or 'latent'")
        result = self.draw(
            class_labels,
            num_images,
            generator=generator,
            batch_size=batch_size,
            decode=output_type != "latent",
            solver=solver,
            steps=num_inference_steps,
            cfg_scale=guidance_scale,
            guidance_interval=guidance_interval,
            atol=atol,
            rtol=rtol,
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
        transformer=model,
        vae=vae.autoencoder,
        sigma_min=cfg.flow.sigma_min,
        solver=s.solver,
        num_inference_steps=s.steps,
        guidance_scale=s.cfg_scale,
        guidance_interval=s.guidance_interval,
        atol=s.atol,
        rtol=s.rtol,
        class_names=list(class_names) if class_names else None,
        objective=cfg.flow.objective,
    )


def save_pipeline(pipe: LatentFlowPipeline, out: Path, cfg: ExperimentConfig, info: dict) -> Path:
    """Write ``pipe`` to ``out`` atomically, with the experiment and where it came from."""
    out = Path(out)
    nbytes = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    nbytes += sum(p.numel() * p.element_size() for p in pipe.vae.parameters())
    with atomic_dir(out, "export", nbytes) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _as_custom_pipeline(tmp)
        save_config(cfg, tmp / "experiment.yaml")
        files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / "latentflow.json").write_text(json.dumps({"format": 2, **info, "files": files}, indent=2))
    return out


CUSTOM_MODULE = "latentflow_pipeline"  # the module file plain diffusers imports the class from
_CUSTOM_SOURCE = '''"""The pipeline class of this export, for plain diffusers:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(THIS_DIRECTORY, trust_remote_code=True)

It needs latentflow installed (pip install latentflow); LatentFlowPipeline.from_pretrained
reads the directory without this file.
"""

from latentflow.pipeline import LatentFlowPipeline

__all__ = ["LatentFlowPipeline"]
'''


def _as_custom_pipeline(directory: Path) -> None:
    """Make a saved pipeline loadable by plain diffusers: the module file, and ``_class_name``
    as [module, class] in model_index.json (diffusers' convention for pipelines outside it)."""
    (directory / f"{CUSTOM_MODULE}.py").write_text(_CUSTOM_SOURCE)
    index = json.loads((directory / "model_index.json").read_text())
    index["_class_name"] = [CUSTOM_MODULE, "LatentFlowPipeline"]
    (directory / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def _read_pipeline_dir(cls, path: Path, dtype=None) -> LatentFlowPipeline:
    """A pipeline directory as latentflow writes it (any release): model_index.json for the
    settings, transformer/ (a registered backbone) and vae/ (an AutoencoderKL), safetensors only."""
    import inspect

    from diffusers import AutoencoderKL

    index = _read_json(path / "model_index.json")
    kind = index.get("transformer")
    name = kind[1] if isinstance(kind, list) and len(kind) == 2 else None
    if name not in MODEL_CLASSES:
        raise CheckpointError(
            f"{path}/model_index.json names transformer {kind!r}, not a latentflow backbone "
            f"({', '.join(MODEL_CLASSES)})"
        )
    with warnings.catch_warnings(), _quiet_diffusers():
        warnings.simplefilter("ignore")
        transformer = MODEL_CLASSES[name].from_pretrained(path / "transformer", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "transformer", "vae"}
    pipe = cls(transformer=transformer, vae=vae, **{k: v for k, v in index.items() if k in accepted})
    return pipe.to(dtype=dtype) if dtype is not None else pipe


def _damaged_file(export: Path, info: dict) -> Optional[str]:
    """The first file of an export whose bytes differ from the hash its latentflow.json
    records (exports written before hashes were recorded are taken as they are)."""
    for name, digest in (info.get("files") or {}).items():
        path = export / name
        if ".." in Path(name).parts or not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match the hash latentflow.json records"
    return None


def _read_json(path: Path, fix: str = "the export is damaged") -> dict:
    try:
        value = read_json(Path(path), Path(path).name)
    except BoundsError as exc:
        raise CheckpointError(f"{exc}; {fix}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({str(exc).splitlines()[0][:80]}); {fix}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a JSON object; {fix}")
    return value


def _foreign_class(index) -> Optional[str]:
    """What in an export's ``model_index.json`` names a class outside latentflow and diffusers
    (a module that plain diffusers with ``trust_remote_code`` would import), or None."""
    ours = (CUSTOM_MODULE, "diffusers", "latentflow")
    for key, value in index.items() if isinstance(index, dict) else ():
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            library = value[0]
            if library.split(".")[0] not in ours:
                return f"names {library}.{value[1]} for {key}"
    return None


def _unbuildable(class_name: str, config: Dict, weights: Dict[str, torch.Tensor], weights_file: Path) -> Optional[str]:
    """Why the model that ``class_name`` and ``config`` describe cannot hold ``weights`` (the
    tensors of ``weights_file``, real or on the meta device), or None. Judged on the meta
    device, so a config that claims a huge model allocates nothing: its tensors must match
    the weights, and all it holds (buffers included) must be of the file's order of size."""
    with torch.device("meta"):
        model = model_from_config(class_name, {k: v for k, v in config.items() if not k.startswith("_")})
    why = _weights_mismatch(model.state_dict(), weights)
    if why:
        return why
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    size = weights_file.stat().st_size
    if held > 4 * size + (64 << 20):
        return f"its config builds a model of {held / 2**30:.1f} GiB from {size / 2**20:.1f} MiB of weights"
    return None


_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _export_unbuildable(folder: Path) -> Optional[str]:
    """``_unbuildable`` for an export's transformer, from its config.json and the header of
    its weights (shapes and dtypes, nothing read); None where diffusers' own checks apply."""
    from safetensors import safe_open

    config_file, weights_file = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    if not (config_file.is_file() and weights_file.is_file()):
        return None
    config = _read_json(config_file)
    if config.get("_class_name") not in MODEL_CLASSES:
        return None
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            header = {k: f.get_slice(k) for k in f.keys()}
            weights = {
                k: torch.empty(v.get_shape(), dtype=_SAFETENSORS_FLOATS.get(v.get_dtype(), torch.int8), device="meta")
                for k, v in header.items()
            }
        why = _unbuildable(config["_class_name"], config, weights, weights_file)
    except Exception as exc:  # a damaged header, a config the class refuses: say it in a few words
        why = explain_load_error(exc)
    huge = [f"{k} {v}" for k, v in config.items() if type(v) is int and v > 1 << 16]
    return f"{why}; config.json says {', '.join(huge)}" if why and huge else why


def _weights_mismatch(expected: Dict[str, torch.Tensor], weights: Dict[str, torch.Tensor]) -> Optional[str]:
    """Why ``weights`` cannot be a model whose state has the shapes of ``expected``, or None:
    a tensor missing or unknown, of another shape, or not floating point (load_state_dict
    would cast integers into the weights without a word)."""
    for key, want in expected.items():
        got = weights.get(key)
        if got is None:
            return f"the weights lack {key}"
        if tuple(got.shape) != tuple(want.shape):
            return f"{key} has shape {tuple(got.shape)}, the model {tuple(want.shape)}"
        if want.is_floating_point() and not got.is_floating_point():
            return f"{key} holds {str(got.dtype).replace('torch.', '')} values, not floating-point weights"
    unknown = sorted(set(weights) - set(expected))
    return f"the weights hold an unknown tensor {unknown[0]}" if unknown else None


def _check_finite(model, where: Path) -> None:
    if not all(p.is_floating_point() for p in model.parameters()):
        raise CheckpointError(f"{where} holds weights that are not floating point; it is damaged, use another")
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
    damaged = "the checkpoint is damaged, use an earlier one"
    try:
        why = _unbuildable(state["model"]["class"], state["model"]["config"], ckpt["ema"], src.path / "ema.safetensors")
        if why:
            raise CheckpointError(f"{src.path}: its weights do not fit its recorded model ({why}); {damaged}")
        model = model_from_config(state["model"]["class"], state["model"]["config"])
        model.load_state_dict(ckpt["ema"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{src.path}: its weights do not fit its recorded model ({explain_load_error(exc)}); {damaged}"
        ) from None
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
    return (
        pipeline_from_parts(model, vae, cfg),
        cfg,
        {"run": str(src.run_dir), "step": info.get("step"), "epoch": info.get("epoch"), "converted_from": "format 1"},
    )


@contextlib.contextmanager
def _quiet_diffusers():
    """Diffusers' own report of a failed load would precede our one line."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity(dlogging.CRITICAL)
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def _from_export(src: Source) -> tuple:
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    fix = "re-export it with `python main.py export --checkpoint RUN --out DIR`"
    cfg_file, info_file = src.path / "experiment.yaml", src.path / "latentflow.json"
    info = _read_json(info_file, fix) if info_file.is_file() else {}
    damaged = _damaged_file(src.path, info)  # before any of it is loaded
    if damaged:
        raise CheckpointError(f"{src.path}: {damaged}; the export is damaged: {fix}")
    foreign = _foreign_class(_read_json(src.path / "model_index.json", fix))
    if foreign:
        raise CheckpointError(
            f"{src.path}: model_index.json {foreign}; an export names only latentflow's and diffusers' classes: {fix}"
        )
    for part in ("transformer", "vae"):  # diffusers parses these itself: bounded first
        if (src.path / part / "config.json").is_file():
            _read_json(src.path / part / "config.json", fix)
        pickles = [p.name for p in (src.path / part).glob("*.bin")] if (src.path / part).is_dir() else []
        if pickles and not list((src.path / part).glob("*.safetensors")):
            raise CheckpointError(
                f"{src.path / part / pickles[0]} is a pickle, which latentflow never loads (it can run "
                f"code); weights must be safetensors: {fix}"
            )
    why = _export_unbuildable(src.path / "transformer")
    if why:
        raise CheckpointError(
            f"{src.path}: its transformer does not fit its config ({why}); the export is damaged: {fix}"
        )
    try:
        pipe = LatentFlowPipeline.from_pretrained(src.path)
    except LatentflowError as exc:
        raise CheckpointError(f"{src.path}: {exc}") from None
    except Exception as exc:  # diffusers' loaders raise OSError, ValueError, RuntimeError, ...
        raise CheckpointError(f"{src.path} cannot be loaded: {explain_load_error(exc)}; {fix}") from None
    c = pipe.config
    stored = SamplerSettings(
        solver=c.solver,
        steps=c.num_inference_steps,
        cfg_scale=c.guidance_scale,
        guidance_interval=c.guidance_interval,
        atol=c.atol,
        rtol=c.rtol,
        objective=c.get("objective", "cfm"),
        guidance_range=pipe.transformer.config.get("guidance_range"),
    )
    try:
        stored.check({k: f"model_index.json's {v}" for k, v in PIPELINE_NAMES.items()})
    except LatentflowError as exc:
        raise CheckpointError(f"{src.path}: {exc}; {fix}") from None
    _check_finite(pipe.transformer, src.path)
    cfg = config_from_file(cfg_file, "export's experiment") if cfg_file.is_file() else None
    return pipe, cfg, info


def load_pipeline(path: Path, device=None, flag: str = "--checkpoint", with_info: bool = False):
    """Open an export, a run directory or a checkpoint as a ``LatentFlowPipeline``
    (on ``device``); with ``with_info`` also return (experiment config, provenance)."""
    src = resolve_source(Path(path), flag)
    load = {"export": _from_export, "checkpoint": _from_checkpoint, "legacy-export": _from_legacy_export}[src.kind]
    pipe, cfg, info = load(src)
    if device is not None:
        pipe.to(device)
    pipe.transformer.eval()
    return (pipe, cfg, info) if with_info else pipe
