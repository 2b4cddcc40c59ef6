"""Shared fixtures: tiny VAEs saved with save_pretrained, an isolated latent cache, no Hub."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Never reach for the Hub in tests, and keep latent caches out of the user's home.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LATENTFLOW_CACHE", str(tmp_path_factory.getbasetemp() / "latent-cache"))


def make_tiny_vae(path: Path, in_channels: int = 1, channels=(8, 8, 8), scaling_factor=0.7, shift_factor=0.1, seed=0):
    from latentflow.train_vae import build_autoencoder

    torch.manual_seed(seed)
    vae = build_autoencoder(in_channels, channels, latent_channels=4, sample_size=32)
    vae.register_to_config(scaling_factor=scaling_factor, shift_factor=shift_factor)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A random 3-level AutoencoderKL (32 px -> 8x8x4) in diffusers format."""
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)
