"""The training loop in-process, on a tiny model: one step, one epoch, a skipped step, and a
resume from an epoch-end checkpoint that continues bit for bit. (The same loop through
``main.py``, with kills and signals, is in tests/commands/test_train.py.)"""

import pytest
import torch

from latentflow.config import load_config
from latentflow.console import Console
from latentflow.distributed import make_accelerator
from latentflow.errors import LatentflowError
from latentflow.faults import Faults
from latentflow.signals import StopRequest
from latentflow.training.checkpoints import Resume
from latentflow.training.loop import end_of_epoch, train_one_epoch, train_step
from latentflow.training.setup import setup
from latentflow.training.state import RunOptions
from tests.conftest import log_records


@pytest.fixture
def make_trainer(tiny_vae_dir, tmp_path):
    """setup() of a 32-digit smoke run with a tiny VAE: 4 steps of batch 8 per epoch."""
    locks = []

    def make(*overrides, resume=None):
        cfg = load_config(
            "smoke",
            [
                f"vae.pretrained={tiny_vae_dir}",
                "data.max_items=32",
                "train.batch_size=8",
                "train.log_with=none",
                *overrides,
            ],
        )
        options = RunOptions(output_dir=tmp_path / "runs", cache_dir=tmp_path / "cache", mixed_precision="no", cpu=True)
        accelerator = make_accelerator("no", cpu=True, grad_accum=cfg.train.grad_accum)
        return setup(cfg, options, accelerator, StopRequest(), locks, resume, Console())

    make.release = lambda: [lock.release() for lock in locks]  # as a finished process would
    yield make
    make.release()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_a_step_takes_one_optimizer_step(make_trainer):
    trainer = make_trainer()
    before = weights(trainer.raw_model)
    result = train_step(trainer, epoch=0, iteration=0)
    assert not result.skipped and torch.isfinite(result.loss) and result.grad_norm > 0
    assert result.bin_count.sum() == 8  # every sample of the batch lands in one t bin
    changed = [not torch.equal(a, b) for a, b in zip(before, weights(trainer.raw_model))]
    assert any(changed)
    assert all(len(s) for s in trainer.optimizer.state.values())  # AdamW moments exist


def test_a_step_with_a_non_finite_loss_is_skipped_and_changes_nothing(make_trainer):
    trainer = make_trainer()
    trainer.faults = Faults({"nonfinite": {1}})  # the first attempt
    before = weights(trainer.raw_model)
    assert train_step(trainer, epoch=0, iteration=0).skipped
    assert all(torch.equal(a, b) for a, b in zip(before, weights(trainer.raw_model)))
    assert not train_step(trainer, epoch=0, iteration=1).skipped  # the next one is not


def test_an_epoch_runs_every_step_and_moves_the_ema(make_trainer):
    trainer = make_trainer()
    initial = weights(trainer.ema.model)
    stats = train_one_epoch(trainer, 0)
    st = trainer.state
    assert trainer.batches.iterations_per_epoch == 4 and st.step == 4 and st.iteration == 4
    assert trainer.ema.updates == 4 and int(stats.loss_count) == 4 and stats.steps_run == 4
    ema, trained = weights(trainer.ema.model), weights(trainer.raw_model)
    assert not all(torch.equal(a, b) for a, b in zip(ema, initial))
    assert not all(torch.equal(a, b) for a, b in zip(ema, trained))  # an average, not a copy


MEANFLOW = (
    "flow.objective=meanflow",
    "flow.tangent=model",
    "flow.instant_steps=2",  # plain flow matching for the first two steps
    "flow.gap_warmup_steps=6",  # then the curriculum, spanning the resume
    "sampler.solver=meanflow",
    "sampler.steps=1",
    "flow.guidance_range=[1, 2.5]",  # guidance as an input, as the experiment has it
    "flow.derivative=difference",  # and its derivative
    "sampler.cfg_scale=2",
    "sampler.guidance_interval=null",  # the default's interval is for ODE solvers
)


@pytest.mark.parametrize("objective", [(), MEANFLOW], ids=["cfm", "meanflow"])
def test_an_epoch_end_checkpoint_resumes_bit_for_bit(make_trainer, objective):
    first = make_trainer("train.epochs=2", *objective)
    end_of_epoch(first, 0, train_one_epoch(first, 0), seconds=1.0)
    checkpoint = first.checkpoints.last
    assert checkpoint.name == "step_00000004" and (first.run_dir / "figures" / "epoch_001.png").is_file()
    train_one_epoch(first, 1)  # the uninterrupted second epoch
    make_trainer.release()
    resumed = make_trainer("train.epochs=2", *objective, resume=Resume(first.run_dir, checkpoint))
    assert resumed.state.epoch == 1 and resumed.state.step == 4
    train_one_epoch(resumed, 1)
    for a, b in zip(weights(first.raw_model), weights(resumed.raw_model)):
        assert torch.equal(a, b)
    for a, b in zip(weights(first.ema.model), weights(resumed.ema.model)):
        assert torch.equal(a, b)


def test_a_meanflow_run_whose_plain_phase_covers_every_step_is_refused(make_trainer, tmp_path):
    """8 steps, a gap warm-up: the step ending the plain phase opens the gaps at width 0, so
    instant_steps=7 trains no jump either; 6 leaves one step with a gap. The data's size
    already says so, so the refusal comes before any image is encoded."""
    for plain in (8, 7):
        with pytest.raises(
            LatentflowError, match=r"instant_steps=\d leaves no step with a gap among the at most 8 steps"
        ):
            make_trainer("train.epochs=2", *MEANFLOW, f"flow.instant_steps={plain}")
    assert not (tmp_path / "runs").exists()  # refused before a run directory exists
    assert not (tmp_path / "cache").exists()  # and before the latent cache is built
    assert make_trainer("train.epochs=2", *MEANFLOW, "flow.instant_steps=6").state.step == 0
    # a quarter held out: 24 rows, 3 steps an epoch; the data's size allowed 8, the rows refuse 6
    with pytest.raises(LatentflowError, match=r"instant_steps=6 leaves no step with a gap among the 6 steps"):
        make_trainer("train.epochs=2", *MEANFLOW, "flow.instant_steps=6", "data.val_fraction=0.25")


def test_grids_come_every_grid_every_epochs_and_at_the_last(make_trainer):
    trainer = make_trainer("train.epochs=3", "train.grid_every=2")
    for epoch in range(3):
        end_of_epoch(trainer, epoch, train_one_epoch(trainer, epoch), seconds=1.0)
    drawn = sorted(p.name for p in (trainer.run_dir / "figures").glob("epoch_*.png"))
    assert drawn == ["epoch_002.png", "epoch_003.png"]
    assert [r["epoch"] for r in log_records(trainer.run_dir, "epoch")] == [1, 2, 3]  # logged all the same


def test_two_ranks_draw_different_noise_but_start_from_identical_weights():
    """The scheme of every multi-process run, checked in-process: rank 0 and rank 1 build the
    same model from the seed, then draw their own noise, times, dropout and posterior samples."""
    from accelerate.utils import set_seed

    from latentflow.config import ExperimentConfig
    from latentflow.models import create_model
    from latentflow.rng import RankRNG
    from latentflow.training.objective import training_loss

    cfg = ExperimentConfig()
    weights, draws = [], []
    for rank in (0, 1):
        set_seed(cfg.train.seed)
        model = create_model("DiT-Nano/2", sample_size=8, in_channels=4, num_classes=10)
        weights.append(torch.cat([p.flatten() for p in model.parameters()]))
        seen = {}

        def spy(x_t, t, y=None):
            seen.update(x_t=x_t.clone(), t=t.clone(), y=y.clone())  # noqa: B023 (called in this iteration)
            return torch.zeros_like(x_t)

        gen = RankRNG(cfg.train.seed, rank, torch.device("cpu")).at(epoch=0, iteration=0)
        eps = torch.randn(64, 4, 8, 8, generator=gen)  # the posterior sample's noise
        training_loss(spy, torch.zeros(64, 4, 8, 8), torch.arange(64) % 10, cfg.flow, 0.5, 10, gen)
        draws.append((eps, seen))
    assert torch.equal(weights[0], weights[1])
    (eps0, s0), (eps1, s1) = draws
    assert not torch.equal(eps0, eps1)
    assert not torch.equal(s0["x_t"], s1["x_t"]) and not torch.equal(s0["t"], s1["t"])
    assert not torch.equal(s0["y"] == 10, s1["y"] == 10)  # different label-dropout masks


def test_learning_rate_schedules():
    from latentflow.config import TrainConfig
    from latentflow.training.optim import learning_rate

    constant = TrainConfig(lr=1e-3, warmup_steps=10)
    assert learning_rate(constant, 0, 100) == pytest.approx(1e-4) and learning_rate(constant, 99, 100) == 1e-3
    cosine = TrainConfig(lr=1e-3, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert learning_rate(cosine, 9, 100) == pytest.approx(1e-3)  # the end of warmup is the peak
    assert learning_rate(cosine, 55, 100) == pytest.approx(0.55e-3)  # half way down: the mean of peak and floor
    assert learning_rate(cosine, 100, 100) == pytest.approx(1e-4) and learning_rate(cosine, 500, 100) == pytest.approx(
        1e-4
    )


def test_validation_loss_depends_on_the_weights_alone(tiny_vae_dir, tmp_path, accelerator):
    from latentflow.config import DataConfig, FlowConfig
    from latentflow.latents import LatentBatches, load_or_build_cache
    from latentflow.models import create_model
    from latentflow.training.progress import validation_loss
    from latentflow.vae import FrozenVAE

    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    from latentflow.data import build_dataset

    cache, _ = load_or_build_cache(vae, build_dataset(DataConfig(max_items=80), 1), tmp_path, accelerator)
    batches = LatentBatches(cache, batch_size=8, seed=0, val_fraction=0.25)
    assert len(batches.val_rows) == 20 and not set(batches.val_rows.tolist()) & set(batches.rows.tolist())
    assert set(batches.permutation(3).tolist()) == set(batches.rows.tolist())  # never trained on
    torch.manual_seed(0)
    model = create_model("DiT-Nano/2", sample_size=8, in_channels=4, num_classes=10)
    first = validation_loss(model, batches, vae, FlowConfig(), seed=0)
    torch.randn(100)  # the global generator moves on: no effect
    assert validation_loss(model, batches, vae, FlowConfig(), seed=0) == first
    with torch.no_grad():
        model.final_layer.linear.bias.add_(0.5)  # the zero-initialised output layer: any change shows
    assert validation_loss(model, batches, vae, FlowConfig(), seed=0) != first
