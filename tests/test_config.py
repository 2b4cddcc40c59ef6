from pathlib import Path

import pytest
import yaml

from latentflow.config import ExperimentConfig, config_to_dict, load_config, save_config
from latentflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "latentflow" / "experiments"


def test_default_yaml_is_the_dataclass_default():
    assert config_to_dict(load_config(EXPERIMENTS / "default.yaml")) == config_to_dict(ExperimentConfig())


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_file_loads(path):
    load_config(path)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["train.lr=1e-3", "model.name=DiT-S/2", "data.max_items=10", "data.path=null"])
    assert cfg.train.lr == 1e-3 and cfg.model.name == "DiT-S/2" and cfg.data.max_items == 10 and cfg.data.path is None


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "sampler.solver=rk4"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", "unknown key 'train.lrr'"),
        ("optim.lr=1", "unknown key 'optim'"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("train.batch_size=0", "train.batch_size must be > 0"),
        ("train.epochs=2.5", "train.epochs must be of type int"),
        ("train.epochs=true", "train.epochs must be of type int"),
        ("train.lr=fast", "train.lr must be of type float"),
        ("sampler.cfg_scale=-0.5", "sampler.cfg_scale must be >= 0"),
        ("sampler.steps=0", "sampler.steps must be > 0"),
        ("sampler.solver=rk45", "sampler.solver is 'rk45'"),
        ("model.name=DiT-Q/2", "model.name 'DiT-Q/2' is not a registered model"),
        ("model.class_dropout=1.5", "model.class_dropout must lie in [0, 1]"),
        ("flow.sigma_min=1", "flow.sigma_min must lie in [0, 1)"),
        ("data.source=csv", "data.source is 'csv'"),
        ("data.source=npz", "data.path is not set"),
        ("train.ema_decay=1", "train.ema_decay must lie in [0, 1)"),
        ("train", "not of the form section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_a_bad_value_is_blamed_on_where_it_came_from(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", ["train.lr=-1"])
    assert str(info.value).endswith("(from --set)") and "smoke.yaml" not in str(info.value)
    (tmp_path / "mine.yaml").write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"train.lr.*\(in .*mine.yaml\)$"):
        load_config(tmp_path / "mine.yaml", ["train.epochs=2"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("train: {epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"train": {"epoch": 3}}))
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch'.*typo.yaml"):
        load_config(tmp_path / "typo.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "experiments" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config_files_parse_and_name_real_options(path):
    """Each shipped launch config loads with accelerate's own reader, every FSDP key is an
    option `accelerate launch` knows, and the class it wraps exists in latentflow."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.num_machines >= 1
    options = {a for action in launch_command_parser()._actions for a in action.option_strings}
    for key, value in (config.fsdp_config or {}).items():
        assert f"--{key}" in options, f"{path.name}: {key} is not an accelerate launch option"
        if key == "fsdp_transformer_layer_cls_to_wrap":
            from latentflow.models import dit

            assert hasattr(dit, value)
    if config.fsdp_config:
        assert config.fsdp_config["fsdp_version"] == 2


def test_built_in_experiments_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
    from latentflow.config import builtin_experiments

    monkeypatch.chdir(tmp_path)
    assert {"default", "smoke", "unet-mnist"} <= set(builtin_experiments())
    assert load_config("smoke").name == "smoke" and load_config("smoke.yaml").name == "smoke"
    assert load_config("experiments/smoke.yaml").name == "smoke"  # where earlier releases kept them
    (tmp_path / "smoke.yaml").write_text("name: mine\n")
    assert load_config("smoke.yaml").name == "mine"  # a file that exists wins
    with pytest.raises(
        ConfigError, match=r"config file nothing.yaml not found; .*built-in experiment \(celeba64, default"
    ):
        load_config("nothing.yaml")


def test_an_average_velocity_objective_goes_with_jumps_and_its_settings_are_checked():
    cfg = load_config("meanflow")
    assert (cfg.flow.objective, cfg.sampler.solver, cfg.sampler.steps) == ("meanflow", "meanflow", 1)
    with pytest.raises(ConfigError, match="sampler.solver midpoint with flow.objective meanflow: a meanflow model"):
        load_config("default", ["flow.objective=meanflow"])
    with pytest.raises(ConfigError, match="sampler.solver meanflow with flow.objective cfm"):
        load_config("default", ["sampler.solver=meanflow"])
    with pytest.raises(ConfigError, match="flow.equal_times must lie in"):
        load_config("meanflow", ["flow.equal_times=1.5"])
    with pytest.raises(ConfigError, match="flow.equal_times=1 makes every training pair r = t"):
        load_config("meanflow", ["flow.equal_times=1"])
    assert load_config("default", ["flow.equal_times=1"]).flow.equal_times == 1.0  # cfm ignores it
    with pytest.raises(ConfigError, match="flow.objective"):
        load_config("default", ["flow.objective=shortcut"])
    with pytest.raises(ConfigError, match="flow.instant_steps, flow.gap_warmup_steps and flow.loss_power must be >= 0"):
        load_config("meanflow", ["flow.instant_steps=-1"])
    assert load_config("meanflow", ["flow.guidance_range=[1, 2.5]"]).flow.guidance_range == [1.0, 2.5]
    with pytest.raises(ConfigError, match="flow.guidance_range is for flow.objective meanflow"):
        load_config("default", ["flow.guidance_range=[1, 2]"])
    with pytest.raises(ConfigError, match=r"flow.guidance_range must be null or \[lo, hi\] with 0 <= lo < hi <= 10"):
        load_config("meanflow", ["flow.guidance_range=[2, 1]"])
    with pytest.raises(ConfigError, match=r"sampler.cfg_scale 3 lies outside flow.guidance_range \[1.0, 2.0\]"):
        load_config("meanflow", ["flow.guidance_range=[1, 2]", "sampler.cfg_scale=3"])
    assert load_config("meanflow").sampler.guidance_interval is None
    with pytest.raises(
        ConfigError,
        match=r"sampler.guidance_interval \[0.2, 1.0\] is for ODE solvers.*set sampler.guidance_interval=null",
    ):
        load_config("default", ["flow.objective=meanflow", "sampler.solver=meanflow"])  # before training, not at a grid


def test_a_tolerance_the_sampler_would_refuse_is_refused_before_training():
    with pytest.raises(
        ConfigError, match=r"sampler.atol must be >= 1e-10 \(dopri5's step would underflow\), got 1e-300"
    ):
        load_config("smoke", ["sampler.atol=1e-300"])
