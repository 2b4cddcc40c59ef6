"""A hostile probe's cases, each as a user (or an attacker) meets it through ``main.py``: damaged
but finite checkpoints, tiny files that would exhaust memory or the stack, out-of-range
numbers, long operations that must listen, leftovers, resumes that cannot be honoured.
Most share the session's smoke run; each asserts the one line, the exit status, and that
nothing was lost or left behind."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentflow.runs import checkpoints_of, latest_checkpoint
from tests.conftest import REPO, SMOKE, log_records, popen, run_main, the_run, wait_for

pytestmark = pytest.mark.slow

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


def one_line_error(proc, *parts):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) < 600, proc.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


@pytest.fixture
def run_copy(smoke_run, tmp_path):
    """A copy of the session's smoke run (checkpoints at steps 4 and 8, an export)."""
    _, run_dir, _ = smoke_run
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("samples", "eval"))
    return copy


def garbage_of_the_same_shape(path: Path) -> None:
    state = load_file(str(path))
    torch.manual_seed(0)
    save_file({k: torch.randn_like(v) * 50 for k, v in state.items()}, str(path))


def test_a_damaged_but_finite_checkpoint_is_passed_over_and_the_resume_is_exact(run_copy, smoke_run, tmp_path):
    """N3: the newest checkpoint's weights overwritten with finite garbage of the same shapes."""
    out, _, _ = smoke_run
    garbage_of_the_same_shape(run_copy / "checkpoints" / "step_00000008" / "model.safetensors")
    sample = run_main(
        "sample", "--checkpoint", run_copy / "checkpoints" / "step_00000008", "--out", tmp_path / "s.png", check=False
    )
    one_line_error(sample, "model.safetensors does not match the hash its state.json records")
    args = ["--config", SMOKE, "--output-dir", run_copy.parent, "--cache-dir", out / "cache"]
    proc = run_main(*args, "--resume", "latest", "--set", "train.epochs=3")
    assert "step_00000008: model.safetensors does not match the hash" in proc.stdout
    assert "resuming from step_00000004" in proc.stdout and "damaged-" in proc.stdout
    assert [s for s, _ in checkpoints_of(run_copy)][-1] == 12
    reference = run_main(
        *args[:2], "--output-dir", tmp_path / "reference", "--cache-dir", out / "cache", "--set", "train.epochs=3"
    )
    assert reference.returncode == 0
    a = load_file(str(latest_checkpoint(run_copy) / "ema.safetensors"))
    b = load_file(str(latest_checkpoint(the_run(tmp_path / "reference")) / "ema.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit the uninterrupted run


def test_a_checkpoint_without_state_json_is_passed_over_and_said(run_copy, smoke_run):
    out, _, _ = smoke_run
    (run_copy / "checkpoints" / "step_00000008" / "state.json").unlink()
    proc = run_main(
        "--config",
        SMOKE,
        "--output-dir",
        run_copy.parent,
        "--cache-dir",
        out / "cache",
        "--resume",
        "latest",
        "--set",
        "train.epochs=3",
    )
    assert (
        "step_00000008: is incomplete (no state.json)" in proc.stdout and "resuming from step_00000004" in proc.stdout
    )


def test_weights_absurd_on_a_probe_batch_are_refused(run_copy, smoke_run):
    """An earlier release's checkpoint (no hashes) with garbage weights: the probe tells."""
    out, _, _ = smoke_run
    for step in ("step_00000004", "step_00000008"):
        ckpt = run_copy / "checkpoints" / step
        state = json.loads((ckpt / "state.json").read_text())
        del state["files"]
        (ckpt / "state.json").write_text(json.dumps(state))
        garbage_of_the_same_shape(ckpt / "model.safetensors")
    proc = run_main(
        "--config",
        SMOKE,
        "--output-dir",
        run_copy.parent,
        "--cache-dir",
        out / "cache",
        "--resume",
        "latest",
        check=False,
    )
    one_line_error(proc, "give a loss of", "on a probe batch", "the checkpoint is damaged")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("guidance_interval", [0.9, 0.1], "guidance_interval [0.9, 0.1]: must be [t_lo, t_hi]"),
        ("solver", "../../x", "model_index.json's solver '../../x': not one of euler"),
        ("num_inference_steps", -5, "num_inference_steps -5: must be an integer in [1, 10000]"),
        ("num_inference_steps", "abc", "num_inference_steps 'abc': must be an integer in [1, 10000]"),
        ("guidance_scale", "nan", "guidance_scale 'nan': must be a finite number"),
    ],
)
def test_an_exports_sampler_settings_are_checked_like_a_configs(smoke_run, tmp_path, field, value, message):
    """N14, N19."""
    _, run_dir, _ = smoke_run
    export = tmp_path / "export"
    shutil.copytree(run_dir / "export", export)
    index = json.loads((export / "model_index.json").read_text())
    index[field] = value
    (export / "model_index.json").write_text(json.dumps(index))
    (export / "latentflow.json").unlink()  # its hashes would refuse the change first
    one_line_error(run_main("sample", "--checkpoint", export, "--out", tmp_path / "s.png", check=False), message)


@pytest.mark.parametrize("name", ["latentflow.json", "model_index.json", "transformer/config.json"])
def test_deep_json_in_an_export_is_one_line(smoke_run, tmp_path, name):
    """N16: 100 000 levels deep."""
    _, run_dir, _ = smoke_run
    export = tmp_path / "export"
    shutil.copytree(run_dir / "export", export)
    (export / name).write_text("[" * 100_000 + "]" * 100_000)
    if name != "latentflow.json":
        (export / "latentflow.json").unlink()
    proc = run_main("sample", "--checkpoint", export, "--out", tmp_path / "s.png", check=False)
    one_line_error(proc, "nested more than the 32 levels")


@pytest.mark.parametrize("content", ["a: " + "[" * 5000 + "]" * 5000, ALIAS_BOMB], ids=["deep", "alias bomb"])
def test_hostile_yaml_in_an_export_or_a_config_is_one_line(smoke_run, tmp_path, content):
    """N9, N10, N17."""
    _, run_dir, _ = smoke_run
    export = tmp_path / "export"
    shutil.copytree(run_dir / "export", export)
    (export / "experiment.yaml").write_text(content)
    (export / "latentflow.json").unlink()
    one_line_error(
        run_main("sample", "--checkpoint", export, "--out", tmp_path / "s.png", check=False),
        "a latentflow file is a few plain levels deep",
    )
    (tmp_path / "hostile.yaml").write_text(content)
    proc = run_main("--config", tmp_path / "hostile.yaml", "--output-dir", tmp_path / "runs", check=False)
    one_line_error(proc, "hostile.yaml")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.batch_size=1000000000000000000000000000000", "train.batch_size is 1000000000000000000000000000000"),
        ("train.grad_accum=1000000000000000000000000000000", "train.grad_accum is 1000000000000000000000000000000"),
        ("sampler.grid_per_class=1000000000", "sampler.grid_per_class is 1000000000, more than 64"),
        ("sampler.steps=1000000000", "sampler.steps is 1000000000, more than 10000"),
        ('name="smoke\\0x"', "must be a plain directory name"),
    ],
)
def test_numbers_and_names_beyond_the_machine_are_refused_before_anything_is_made(tmp_path, override, message):
    """N11, N12, N13, N18 (the steps)."""
    proc = run_main("--config", SMOKE, "--set", override, "--output-dir", tmp_path / "runs", check=False)
    one_line_error(proc, message)
    assert not (tmp_path / "runs").exists()


def test_a_sample_count_that_cannot_fit_is_refused_at_once(smoke_run, tmp_path):
    """N15."""
    _, run_dir, _ = smoke_run
    start = time.time()
    proc = run_main(
        "sample", "--checkpoint", run_dir, "--num-samples", "1000000000", "--out", tmp_path / "s.png", check=False
    )
    one_line_error(proc, "--num-samples 1000000000: that many images need about")
    assert time.time() - start < 60 and not list(tmp_path.iterdir())


def test_sigterm_during_the_epoch_grid_stops_within_seconds_with_a_checkpoint(tmp_path):
    """N18: a grid of 10 000 solver steps, interrupted."""
    log = open(tmp_path / "out.log", "w")
    proc = popen(
        [
            sys.executable,
            str(REPO / "main.py"),
            "--config",
            SMOKE,
            "--set",
            "sampler.steps=10000",
            "--set",
            "train.log_with=none",
            "--output-dir",
            str(tmp_path / "runs"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_for(
        lambda: (
            (tmp_path / "runs").is_dir()
            and any(r["step"] == 4 for p in (tmp_path / "runs").iterdir() for r in log_records(p, "step"))
        ),
        what="epoch 1's steps",
    )
    time.sleep(2)  # drawing the grid now
    os.kill(proc.pid, signal.SIGTERM)
    start = time.time()
    assert proc.wait(timeout=60) == 143
    assert time.time() - start < 15
    run = the_run(tmp_path / "runs")
    assert latest_checkpoint(run).name == "step_00000004" and not (run / "export").exists()
    assert "stopped (SIGTERM) after optimizer step 4" in (tmp_path / "out.log").read_text()


def test_a_killed_export_overwrite_leaves_nothing_after_the_next_export(smoke_run, tmp_path):
    """N2: the temporary a SIGKILLed `export --overwrite` leaves, removed by the next one."""
    _, run_dir, _ = smoke_run
    out = tmp_path / "pipe"
    run_main("export", "--checkpoint", run_dir, "--out", out)
    host = __import__("latentflow.files", fromlist=["HOST"]).HOST
    stale = tmp_path / f".pipe.tmp-{host}-{2**22 + 17}"  # a writer that was killed: its pid is gone
    shutil.copytree(out, stale)
    run_main("export", "--checkpoint", run_dir, "--out", out, "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_a_set_aside_checkpoint_can_be_sampled_and_resumed_by_path(run_copy, smoke_run, tmp_path):
    """N5: checkpoints under checkpoints/abandoned-<time>/."""
    out, _, _ = smoke_run
    aside = run_copy / "checkpoints" / "abandoned-20261201-120000"
    aside.mkdir()
    shutil.copytree(run_copy / "checkpoints" / "step_00000004", aside / "step_00000004")
    run_main("sample", "--checkpoint", aside / "step_00000004", "--num-samples", "4", "--out", tmp_path / "s.png")
    proc = run_main("--config", SMOKE, "--cache-dir", out / "cache", "--resume", aside / "step_00000004")
    assert f"resuming {run_copy} from step_00000004" in proc.stdout
    assert latest_checkpoint(run_copy).name == "step_00000008"


def test_sample_into_a_read_only_run_is_refused_before_sampling(run_copy, tmp_path):
    """N6: and the fix it names is a flag `sample` has."""
    from tests.conftest import mount_tmpfs

    disk = tmp_path / "ro"
    unmount = mount_tmpfs(disk, "50m")
    try:
        shutil.copytree(run_copy, disk / run_copy.name)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        proc = run_main("sample", "--checkpoint", disk / run_copy.name, "--num-samples", "4", check=False)
        one_line_error(proc, "is not writable (Read-only file system); choose another --out")
    finally:
        unmount()


def test_a_pickle_in_an_export_is_refused_in_one_line(smoke_run, tmp_path):
    """N7: a pickle that would run code, where the weights should be."""
    _, run_dir, _ = smoke_run
    export = tmp_path / "export"
    shutil.copytree(run_dir / "export", export)
    (export / "latentflow.json").unlink()
    weights = export / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    (weights.parent / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    proc = run_main("sample", "--checkpoint", export, "--out", tmp_path / "s.png", check=False)
    one_line_error(proc, "diffusion_pytorch_model.bin is a pickle, which latentflow never loads")
    assert "pwned" not in proc.stdout


def test_a_damaged_export_is_refused_by_its_hashes(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    export = tmp_path / "export"
    shutil.copytree(run_dir / "export", export)
    garbage_of_the_same_shape(export / "transformer" / "diffusion_pytorch_model.safetensors")
    proc = run_main("sample", "--checkpoint", export, "--out", tmp_path / "s.png", check=False)
    one_line_error(proc, "transformer/diffusion_pytorch_model.safetensors does not match the hash latentflow.json")


def test_workers_killed_launcher_during_encode_stop_without_starting_a_run(tmp_path):
    """N1: SIGKILL of the launcher's process group while two processes encode the cache."""
    from tests.conftest import LAUNCH, alive, children

    log = open(tmp_path / "out.log", "w")
    proc = popen(
        [
            *LAUNCH,
            "--config",
            SMOKE,
            "--set",
            "data.max_items=4500",
            "--set",
            "vae.cache_shard_size=64",
            "--set",
            "vae.encode_batch_size=16",
            "--output-dir",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_for(lambda: len(list(tmp_path.glob("cache/*/shard_*.done"))) >= 2, what="encoding")
    workers = children(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not any(alive(w) for w in workers), timeout=45, what="the workers to stop")
    runs = list((tmp_path / "runs").glob("*")) if (tmp_path / "runs").exists() else []
    assert not any(checkpoints_of(r) for r in runs)  # no run was started after the launcher died


def test_untrusted_exports_and_checkpoints_are_refused_before_anything_runs_or_is_allocated(smoke_run, tmp_path):
    """A second probe's cases, in process (each is one line from ``load_pipeline``): a foreign
    class in model_index.json, an interval that is a number, a billion steps; a checkpoint
    whose weights are integers, and one whose state.json claims a model 64 times wider."""
    from latentflow.errors import CheckpointError
    from latentflow.files import file_digest
    from latentflow.pipeline import load_pipeline

    _, run_dir, _ = smoke_run

    def export_with(**changes) -> Path:
        export = tmp_path / f"export-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(run_dir / "export", export)
        index = json.loads((export / "model_index.json").read_text())
        (export / "model_index.json").write_text(json.dumps({**index, **changes}))
        (export / "latentflow.json").unlink()  # its hashes would refuse any change first
        return export

    marker = tmp_path / "imported"
    evil = export_with(transformer=["evil_probe", "DiT"])
    (evil / "evil_probe.py").write_text(f"open({str(marker)!r}, 'w')\nclass DiT: pass\n")
    huge = export_with()
    config = json.loads((huge / "transformer" / "config.json").read_text())
    (huge / "transformer" / "config.json").write_text(json.dumps({**config, "sample_size": 10**6}))
    cases = [
        (evil, "model_index.json names evil_probe.DiT for transformer"),
        (huge, "its transformer does not fit its config (its config builds a model of"),  # never allocated
        (export_with(guidance_interval=5), "guidance_interval 5: must be [t_lo, t_hi]"),
        (export_with(num_inference_steps=10**9), "num_inference_steps 1000000000: must be an integer in [1, 10000]"),
    ]
    for source, message in cases:
        with pytest.raises(CheckpointError) as info:
            load_pipeline(source)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert not marker.exists()  # the foreign module was never imported

    def checkpoint_with(edit) -> Path:
        ckpt = tmp_path / f"run-{len(list(tmp_path.iterdir()))}" / "checkpoints" / "step_00000008"
        shutil.copytree(run_dir, ckpt.parents[1], ignore=shutil.ignore_patterns("samples", "eval", "export", "best"))
        state = json.loads((ckpt / "state.json").read_text())
        edit(ckpt, state)
        state["files"] = {name: file_digest(ckpt / name) for name in state["files"]}  # hashes that match
        (ckpt / "state.json").write_text(json.dumps(state))
        return ckpt

    def integers(ckpt, state):
        weights = load_file(str(ckpt / "ema.safetensors"))
        save_file(
            {k: torch.randint(-100, 100, v.shape, dtype=torch.int8) for k, v in weights.items()},
            str(ckpt / "ema.safetensors"),
        )

    def wider(ckpt, state):
        state["model"]["config"].update(hidden_size=4096, num_heads=64)

    for edit, message in [(integers, "holds int8 values, not floating-point weights"), (wider, "has shape")]:
        with pytest.raises(CheckpointError) as info:
            load_pipeline(checkpoint_with(edit))
        assert message in str(info.value) and "the checkpoint is damaged" in str(info.value), str(info.value)
