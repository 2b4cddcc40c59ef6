"""Two processes through ``accelerate launch`` (gloo on CPU): the same code, one run dir."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_two_process_launch(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "main.py"), "--config", str(REPO / "experiments" / "smoke.yaml"),
           "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--set", "data.max_items=128"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "2 process(es)" in output and "mixed precision no" in output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("smoke-")]
    assert output.count("epoch   2/2") == 1  # only the main process prints
    epochs = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines() if '"epoch"' in l]
    # 128 items over 2 processes x batch 16: 4 optimizer steps per epoch
    assert [e["step"] for e in epochs if e["event"] == "epoch"] == [4, 8]
    assert (run_dir / "export" / "model.safetensors").is_file()
