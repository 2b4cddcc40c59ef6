"""``python main.py encode``: build an experiment's latent cache without training (under a
launcher, every process encodes its shards)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from . import TERMINAL, experiment, say

__all__ = ["encode_experiment", "main"]


def encode_experiment(cfg, cache_dir: Optional[Path] = None, cpu: bool = False, dist_timeout: float = 180.0) -> Path:
    """Encode ``cfg``'s training data into the latent cache; returns the cache directory."""
    from ..distributed import is_launched, make_accelerator
    from ..errors import Stopped
    from ..faults import Faults
    from ..latents import default_cache_dir, load_or_build_cache, vae_and_data
    from ..signals import StopRequest
    from ..training import Interrupted

    stop = StopRequest().watch_parent() if is_launched() else StopRequest()  # a dead launcher stops the encode
    accelerator = make_accelerator("no", cpu, 1, dist_timeout)
    main_process = accelerator.is_main_process
    vae, dataset = vae_and_data(cfg, accelerator.device, TERMINAL if main_process else None)
    start = time.perf_counter()
    try:
        cache, root = load_or_build_cache(
            vae,
            dataset,
            cache_dir or default_cache_dir(),
            accelerator,
            cfg.data,
            cfg.vae,
            console=TERMINAL if main_process else None,
            faults=Faults.from_env(),
            stop=lambda: stop.requested,
        )
    except Stopped:
        reason, status = StopRequest.describe(stop.code)
        raise Interrupted(f"stopped ({reason}); the shards already encoded are kept", status) from None
    finally:
        stop.uninstall()
    if main_process:
        say(
            f"latent cache {root}: {len(cache)} rows of {tuple(cache.latent_shape)} "
            f"({time.perf_counter() - start:.1f} s, {accelerator.num_processes} process(es))"
        )
    accelerator.end_training()
    return root


def main(args) -> None:
    encode_experiment(experiment(args), args.cache_dir, args.cpu, args.dist_timeout)
