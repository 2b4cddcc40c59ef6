"""Run by tests/training/test_fsdp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): a DiT sharded
with torch's ``fully_shard`` trains a few steps with a sharded EMA; latentflow's checkpoint
code saves it and loads it into a freshly initialised sharded model and into a plain one.
Each rank writes what it found to OUT/rank<r>.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from latentflow.ema import EMA
from latentflow.models import create_model
from latentflow.runs import load_checkpoint
from latentflow.training.checkpoints import (
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    save_checkpoint,
)
from latentflow.training.optim import all_finite
from tests.conftest import leave_process_group


def build(seed):
    torch.manual_seed(seed)
    model = create_model("DiT-Nano/2", sample_size=8, in_channels=4, num_classes=10)
    with torch.no_grad():  # move off the zero-initialised output so every weight gets gradients
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ema = EMA(model, 0.9)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    ema.track(model)
    return model, ema, torch.optim.AdamW(model.parameters(), lr=1e-3)


def step(model, ema, opt, k):
    g = torch.Generator().manual_seed(100 * k + dist.get_rank())  # each rank its own batch
    x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g), torch.randint(0, 10, (4,), generator=g)
    loss = (model(x, t, y) - x).pow(2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.update(model)


def full(params):
    return [p.full_tensor() for p in params]


def main(out: Path):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, ema, opt = build(0)
    for k in range(3):
        step(model, ema, opt, k)
    found = {
        "sharded": type(next(model.parameters())).__name__ == "DTensor",
        "local_rows": next(model.parameters()).to_local().shape[0],
    }
    model_sd, ema_sd, opt_sd = model_state(model), ema.state_dict(), optimizer_state(model, opt)  # collectives
    if rank == 0:
        save_checkpoint(
            out / "run",
            3,
            model=model_sd,
            ema=ema_sd,
            optimizer={"optimizer": opt_sd, "scaler": None},
            rng={"world_size": 2, "ranks": []},
            keep=2,
            state={
                "step": 3,
                "epoch": 0,
                "train_state": {},
                "model": {"class": "DiT", "config": {}},
                "num_classes": 10,
                "latent_shape": [4, 8, 8],
                "vae": {"identity": "none"},
            },
        )
    found["rank0_has_state"] = bool(model_sd)
    dist.barrier()

    ckpt = load_checkpoint(out / "run" / "checkpoints" / "step_00000003")
    model2, ema2, opt2 = build(1)  # another initialisation, then the checkpoint
    load_model_state(model2, ckpt["model"])
    load_optimizer_state(model2, opt2, ckpt["optimizer"]["optimizer"])
    ema2.load_state_dict(ckpt["ema"], ema.updates)
    found["model_restored"] = all(
        torch.equal(a, b) for a, b in zip(full(model.parameters()), full(model2.parameters()))
    )
    found["ema_restored"] = all(
        torch.equal(a, b) for a, b in zip(ema.materialize().parameters(), ema2.materialize().parameters())
    )
    state1, state2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    found["optimizer_restored"] = all(
        torch.equal(
            state1[i][k].to_local() if hasattr(state1[i][k], "to_local") else state1[i][k],
            state2[i][k].to_local() if hasattr(state2[i][k], "to_local") else state2[i][k],
        )
        for i in state1
        for k in state1[i]
    )
    step(model, ema, opt, 3)  # both continue the same way
    step(model2, ema2, opt2, 3)
    found["continues_identically"] = all(
        torch.equal(a, b) for a, b in zip(full(model.parameters()), full(model2.parameters()))
    )
    found["finite"] = all_finite(model)
    with torch.no_grad():
        next(model.parameters()).to_local().view(-1)[0] = float("nan") if rank == 1 else 0.0
    found["nan_on_one_rank_seen_by_all"] = not all_finite(model)
    if rank == 0:  # the same checkpoint in a plain, unsharded model
        plain = create_model("DiT-Nano/2", sample_size=8, in_channels=4, num_classes=10)
        plain.load_state_dict(ckpt["model"])
        found["plain_loads"] = all(torch.equal(a, ckpt["model"][n]) for n, a in plain.state_dict().items())
        found["no_prefixes"] = not any("_orig_mod" in k or "_fsdp" in k for k in ckpt["model"])
    (out / f"rank{rank}.json").write_text(json.dumps(found))
    del model, model2, ema, ema2, opt, opt2
    leave_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
