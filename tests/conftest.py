"""Shared fixtures: tiny VAEs saved with save_pretrained, an isolated latent cache, no Hub,
and helpers that run ``main.py`` as a user does (in a subprocess)."""

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "latentflow" / "experiments" / "smoke.yaml")
EXPERIMENTS = REPO / "latentflow" / "experiments"

# Never reach for the Hub in tests, and keep latent caches out of the user's home.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LATENTFLOW_CACHE", str(tmp_path_factory.getbasetemp() / "latent-cache"))


def make_tiny_vae(path: Path, in_channels: int = 1, channels=(8, 8, 8), scaling_factor=0.7, shift_factor=0.1, seed=0):
    from latentflow.config import AutoencoderConfig
    from latentflow.training.vae import build_autoencoder

    torch.manual_seed(seed)
    vae = build_autoencoder(in_channels, AutoencoderConfig(block_out_channels=list(channels), latent_channels=4), 32)
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


def _env(extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("LATENTFLOW_FAULTS", None)
    env.pop("LATENTFLOW_LAUNCH_COMMAND", None)
    env.update(extra or {})
    return env


def run_main(*args, cwd=None, check=True, env=None, timeout=300):
    """``python main.py ARGS`` in a subprocess, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "main.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(env),
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"main.py {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def leave_process_group() -> None:
    """End a torchrun worker's gloo group in step: every rank waits until all are past their last
    collective, so no rank shuts its connections while a peer still uses them (an abort at exit
    under a loaded machine otherwise), and garbage holding the group is collected first."""
    import torch.distributed as dist

    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def torchrun(worker: Path, *args, processes: int = 2, timeout: int = 300) -> None:
    """Run ``worker ARGS`` under ``torchrun --nproc_per_node PROCESSES`` (gloo on this CPU);
    a failure shows both ranks' output."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            str(worker),
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    str(REPO / "main.py"),
]


def launch(*args, check=True, env=None, timeout=400):
    """``accelerate launch`` with two gloo processes on this CPU."""
    proc = subprocess.run([*LAUNCH, *map(str, args)], capture_output=True, text=True, env=_env(env), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"launch {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def popen(cmd, env=None, **kw):
    """Start a command in the background (its own process group), output to a file."""
    return subprocess.Popen(cmd, env=_env(env), start_new_session=True, **kw)


def wait_for(predicate, timeout=120, what="condition"):
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def log_records(run_dir: Path, event=None):
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if event is None or r.get("event") == event]


def the_run(out: Path, prefix: str = "smoke") -> Path:
    (run,) = [p for p in Path(out).iterdir() if p.is_dir() and p.name.startswith(prefix)]
    return run


def children(pid: int):
    """Process ids whose parent is ``pid``."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return sorted(kids)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One smoke training run (python main.py --config experiments/smoke.yaml), shared."""
    out = tmp_path_factory.mktemp("runs")
    proc = run_main("--config", SMOKE, "--output-dir", out, "--cache-dir", out / "cache")
    return out, the_run(out), proc


def mount_tmpfs(path: Path, size: str):
    """Mount a real tmpfs of ``size`` at ``path`` (root can, here); skip the test otherwise.
    Returns a function that unmounts it."""
    path.mkdir(parents=True, exist_ok=True)
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here (tests/test_runtime.py injects the same write errors)")
    return lambda: subprocess.run(["umount", "-l", str(path)], capture_output=True)
