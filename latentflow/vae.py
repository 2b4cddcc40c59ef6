"""The frozen pretrained VAE: a diffusers ``AutoencoderKL`` loaded with ``from_pretrained``
from a Hub id or a local directory (the embedded MNIST VAE goes through the same path).

It is put in eval mode with gradients off and is never handed to ``accelerator.prepare``:
it only encodes the dataset once (into the latent cache) and decodes samples. Its scaling
and shift factors and its downsampling factor come from its own config, never from
literals:

    x = (z - shift_factor) * scaling_factor      (model space, roughly unit variance)
    z = x / scaling_factor + shift_factor         (VAE space, what the decoder takes)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import urlparse

import torch

from .errors import LatentflowError

__all__ = ["EMBEDDED_VAE", "FrozenVAE", "explain_load_error", "resolve_vae_path"]

EMBEDDED_VAE = Path(__file__).resolve().parent / "assets" / "mnist-vae"


class VAELoadError(LatentflowError):
    pass


def resolve_vae_path(name: str) -> str:
    """'embedded' -> the shipped VAE directory; anything else unchanged."""
    return str(EMBEDDED_VAE) if name == "embedded" else name


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def explain_load_error(exc: BaseException) -> str:
    """The gist of a diffusers/torch loading error, in a few words (no advice meant for
    other situations, such as diffusers' low_cpu_mem_usage hint)."""
    import re

    text = " ".join(str(exc).split())
    for pattern, say in (
        (r"size mismatch for ([\w.]+)", "the shape of {} differs from what config.json builds"),
        (r"because ([\w.]+) expected shape", "the shape of {} differs from what config.json builds"),
        (r"[Mm]issing key\(s\) in state_dict: \"?([\w.]+)", "the weights lack {}"),
        (r"keys are missing:? \[?'?([\w.]+)", "the weights lack {}"),
        (r"[Uu]nexpected key\(s\) in state_dict: \"?([\w.]+)", "the weights hold an unknown tensor {}"),
    ):
        m = re.search(pattern, text)
        if m:
            return say.format(m.group(1))
    if "meta tensor" in text:
        return "the weights lack tensors that config.json needs"
    first = re.split(r"(?<=[.;])\s|Please |You can ", text)[0]
    return f"{type(exc).__name__}: {first[:150]}"


def _load_autoencoder(name: str, subfolder: Optional[str]):
    from diffusers import AutoencoderKL

    path = Path(resolve_vae_path(name)).expanduser()
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if path.exists() and not path.is_dir():
        raise VAELoadError(f"vae.pretrained {path} is a file; give the directory that save_pretrained wrote")
    if path.is_dir():
        if subfolder and not (path / subfolder).is_dir():
            raise VAELoadError(f"{path} has no subfolder {subfolder!r}; fix vae.subfolder (or set it to null)")
        if not ((path / (subfolder or "")) / "config.json").is_file():
            raise VAELoadError(
                f"{path / (subfolder or '')} has no config.json; it needs config.json and "
                "diffusion_pytorch_model.safetensors (save_pretrained writes both)"
            )
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # its report of a failed load would precede ours
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a foreign pickle warns before it is refused
                return AutoencoderKL.from_pretrained(path, use_safetensors=True, **kwargs)
        except Exception as exc:  # diffusers raises OSError, ValueError, RuntimeError, NotImplementedError ...
            raise VAELoadError(
                f"VAE {path} cannot be loaded: {explain_load_error(exc)}; re-save it with save_pretrained"
            ) from None
        finally:
            diffusers_logging.set_verbosity(verbosity)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith("/")
    if looks_like_path:
        raise VAELoadError(
            f"VAE directory {name} not found; pass vae.pretrained=DIR (a diffusers save_pretrained folder)"
        )
    try:  # already in the local Hugging Face cache?
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoencoderKL.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    hint = (
        f"cannot load VAE {name!r}: it is not in the local Hugging Face cache and the Hub is unreachable; "
        f"on a connected machine run `hf download {name} --local-dir DIR`, copy DIR here "
        f"and pass vae.pretrained=DIR"
    )
    if not _hub_reachable():
        raise VAELoadError(hint)
    try:
        return AutoencoderKL.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise VAELoadError(f"{hint} ({str(exc).splitlines()[0]})") from None


class FrozenVAE:
    """A frozen ``AutoencoderKL`` with the scale/shift and shape facts the trainer needs."""

    def __init__(self, autoencoder, name: str):
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.name = name
        config = autoencoder.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.shift_factor or 0.0)
        self.in_channels = int(config.in_channels)
        self.latent_channels = int(config.latent_channels)
        per_channel = (
            getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None
        )
        if per_channel:  # (1, C, 1, 1) so that they broadcast over latents (B, C, h, w)
            try:
                mean = torch.tensor(config.latents_mean, dtype=torch.float32).flatten()
                std = torch.tensor(config.latents_std, dtype=torch.float32).flatten()
            except (TypeError, ValueError):
                raise VAELoadError(
                    f"VAE {name}: config latents_mean and latents_std must be lists of numbers, "
                    f"got {config.latents_mean!r} and {config.latents_std!r}"
                ) from None
            for key, values in (("latents_mean", mean), ("latents_std", std)):
                if len(values) != self.latent_channels:
                    raise VAELoadError(
                        f"VAE {name}: config {key} has {len(values)} values for {self.latent_channels} latent "
                        "channels; give one per channel"
                    )
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
                raise VAELoadError(
                    f"VAE {name}: config latents_std must be finite and > 0 and latents_mean finite "
                    f"(got mean {mean.tolist()}, std {std.tolist()})"
                )
            self._shift = mean.view(1, -1, 1, 1)
            self._scale = self.scaling_factor / std.view(1, -1, 1, 1)
        else:
            self._shift = torch.tensor(self.shift_factor).view(1, 1, 1, 1)
            self._scale = torch.tensor(self.scaling_factor).view(1, 1, 1, 1)
        if not (torch.isfinite(self._scale).all() and (self._scale != 0).all() and torch.isfinite(self._shift).all()):
            raise VAELoadError(
                f"VAE {name}: scaling_factor {self.scaling_factor} / shift_factor {self.shift_factor} "
                "must be finite and the scale non-zero"
            )
        self.normalization = "per-channel latents_mean/latents_std" if per_channel else "scalar shift/scale"
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self._identity: Optional[str] = None

    @classmethod
    def from_pretrained(cls, name: str, subfolder: Optional[str] = None) -> FrozenVAE:
        autoencoder = _load_autoencoder(name, subfolder)
        # diffusers leaves weights that the file lacks on the meta device; say so here rather
        # than fail later with "Cannot copy out of meta tensor"
        missing = [k for k, t in (*autoencoder.named_parameters(), *autoencoder.named_buffers()) if t.is_meta]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise VAELoadError(
                f"VAE {name}: its weights file lacks {missing[0]}{more}; the file is incomplete or "
                "belongs to another architecture (save it again with save_pretrained)"
            )
        return cls(autoencoder, name)

    # --- facts ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    def to(self, device) -> FrozenVAE:
        self.autoencoder.to(device)
        return self

    def latent_shape(self, image_size: int) -> Tuple[int, int, int]:
        """(C, h, w) of the latents of an image_size x image_size image."""
        if image_size % self.downsample:
            raise LatentflowError(
                f"image size {image_size} is not divisible by the VAE's downsampling factor "
                f"{self.downsample} ({self.name}); set data.image_size to a multiple of it"
            )
        side = image_size // self.downsample
        return (self.latent_channels, side, side)

    @property
    def identity(self) -> str:
        """Name plus a hash of config and weights: two VAEs with the same identity encode alike."""
        if self._identity is None:
            h = hashlib.sha256(json.dumps(dict(self.autoencoder.config), sort_keys=True, default=str).encode())
            for key, tensor in self.autoencoder.state_dict().items():
                h.update(key.encode())
                h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._identity = f"{os.path.basename(self.name.rstrip('/'))}@{h.hexdigest()[:16]}"
        return self._identity

    def normalization_lists(self) -> Tuple[list, list]:
        """(shift, scale) per latent channel: model space = (z - shift) * scale."""
        c = self.latent_channels
        return self._shift.expand(1, c, 1, 1).flatten().tolist(), self._scale.expand(1, c, 1, 1).flatten().tolist()

    def same_weights_as(self, identity: str) -> bool:
        """Whether a recorded ``identity`` is this VAE's: the hashes agree (the name may differ,
        e.g. the embedded VAE copied to a directory)."""
        return identity.rsplit("@", 1)[-1] == self.identity.rsplit("@", 1)[-1]

    # --- maps ----------------------------------------------------------------------------

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """VAE-space latents -> model space (about zero mean, unit variance per channel)."""
        return (z - self._shift.to(z.device)) * self._scale.to(z.device)

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> VAE space, what the decoder takes."""
        return x / self._scale.to(x.device) + self._shift.to(x.device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) in [-1, 1] -> posterior mean and std (B, c, h, w), VAE space."""
        dtype = next(self.autoencoder.parameters()).dtype
        posterior = self.autoencoder.encode(images.to(self.device, dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """model-space latents (B, c, h, w) -> images (B, C, H, W) in [-1, 1]."""
        dtype = next(self.autoencoder.parameters()).dtype
        z = self.unscale(x.to(self.device).float()).to(dtype)
        return self.autoencoder.decode(z).sample.float().clamp(-1, 1)
