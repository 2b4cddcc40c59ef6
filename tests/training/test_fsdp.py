"""Sharded state under torch's FSDP (``fully_shard``), on this CPU with gloo through
``torchrun``: latentflow's checkpoint code and EMA with a sharded model. (Accelerate turns
an FSDP launch into DDP without a GPU; the full FSDP launch is a GPU check.)"""

import json
from pathlib import Path

import pytest

from tests.conftest import torchrun

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_sharded_checkpoint_save_and_load_under_torchrun(tmp_path):
    torchrun(HERE / "fsdp_checkpoint_worker.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for found in ranks:
        assert found["sharded"] and found["local_rows"] == 32  # half of the 64 rows on each rank
        for key in (
            "model_restored",
            "ema_restored",
            "optimizer_restored",
            "continues_identically",
            "finite",
            "nan_on_one_rank_seen_by_all",
        ):
            assert found[key], key
    assert ranks[0]["rank0_has_state"] and not ranks[1]["rank0_has_state"]  # full tensors gathered on rank 0 only
    assert ranks[0]["plain_loads"] and ranks[0]["no_prefixes"]
