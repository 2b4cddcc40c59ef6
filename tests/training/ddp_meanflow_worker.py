"""Run by tests/training/test_meanflow.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): the
MeanFlow loss of a DDP-wrapped two-time DiT, with its forward-mode derivative and a
no-gradient guidance pass, each rank on its half of one seeded batch; then again with the
derivative by a forward difference (plain passes, one with gradient and one without). Rank 0
saves the gradients DDP averaged, for comparison with one process on the whole batch."""

import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import leave_process_group
from tests.training.test_meanflow import batch, meanflow_grads, two_time_dit


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    half = [x.chunk(world)[rank] for x in batch()]
    for difference in (False, True):
        model = DistributedDataParallel(two_time_dit())
        grads = meanflow_grads(model, model.module, *half, difference=difference)
        if rank == 0:
            save_file(grads, str(out / f"ddp-{'difference' if difference else 'jvp'}.safetensors"))
        del model
    leave_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
