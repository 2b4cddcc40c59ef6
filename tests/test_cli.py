"""The command line: the table of commands, flag checks, and one-line errors for bad input
(those through ``python main.py`` in a subprocess, as a user runs it)."""

import pytest

from tests.conftest import run_main


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "train.lr=-1"], "train.lr must be > 0"),
        (["--set", "train.lr=.inf"], "train.lr must be a finite number, got inf"),
        (["--set", "model.name=DiT-S/16"], "not a registered model"),
        (["--resume", "/does/not/exist"], "no such directory"),
        (["--set", "data.source=npz", "--set", "data.path=missing.npz"], "missing.npz not found"),
        (["--set", "vae.pretrained=./no-vae-here"], "VAE directory ./no-vae-here not found"),
        (
            ["--set", "model.name=DiT-Nano/8", "--set", "data.image_size=48"],
            "patch size 8 does not divide the latent size 12",
        ),
        (["--set", "data.image_size=4096"], "set data.image_size to at most 56"),
        (["sample", "--checkpoint", "nowhere", "--out", "x.png"], "no such directory"),
        (["launch", "--num_processes", "1", "--", "--set", "train.lr=nan"], "train.lr must be a finite number"),
    ],
)
def test_bad_input_is_one_line_not_a_traceback(tmp_path, args, message):
    if args[0] in ("sample", "launch"):
        proc = run_main(*args, check=False, cwd=tmp_path)
    else:
        proc = run_main(*args, "--output-dir", tmp_path, check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_every_subcommand_has_help_with_an_example():
    from latentflow.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert p.epilog and "example:" in p.epilog and "python main.py" in p.epilog, name
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings}"


def test_the_flag_choices_are_the_registries():
    from latentflow import cli
    from latentflow.evaluation.features import FEATURE_NETS
    from latentflow.solvers import SOLVERS

    assert cli.SOLVERS == SOLVERS and cli.FEATURE_NETS == FEATURE_NETS


def test_help_answers_without_loading_torch():
    import subprocess
    import sys

    code = (
        "import sys; from latentflow.cli import build_parser; build_parser().format_help(); "
        "import latentflow; print('torch' in sys.modules, 'latentflow.pipeline' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_every_command_is_in_the_top_level_help():
    from latentflow.cli import COMMANDS, build_parser

    text = build_parser().format_help()
    for name in COMMANDS:
        assert name in text, name
    assert "launch" in COMMANDS


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sample", "--checkpoint", "x", "--num-samples", "0"], "--num-samples must be an integer >= 1, got 0"),
        (["sample", "--checkpoint", "x", "--cfg-scale", "nan"], "--cfg-scale must be a finite number >= 0, got nan"),
        (["--dist-timeout", "-1"], "--dist-timeout must be a finite number > 0, got -1.0"),
        (["bench", "--model", "DiT-Q/2"], "--model 'DiT-Q/2' is not a registered model"),
        (["bench", "--batches", "8,x"], "--batches '8,x': expected batch sizes like 32,64,128"),
    ],
)
def test_flag_values_that_parse_but_cannot_be_used_are_one_line(capsys, argv, message):
    from latentflow.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_data_assignments_take_several_values_per_flag():
    from latentflow.cli import build_parser

    args = build_parser().parse_args(["fd-stats", "--data", "split=test", "max_items=10", "--data", "path=null"])
    assert args.data == [("split", "test"), ("max_items", 10), ("path", None)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reconstruct", "--data", "novalue"])


def test_the_baseline_batch_keeps_its_old_flag():
    from latentflow.cli import build_parser

    assert build_parser().parse_args(["bench", "--seed-batch", "8"]).baseline_batch == 8
    assert build_parser().parse_args(["bench", "--baseline-batch", "8"]).baseline_batch == 8
