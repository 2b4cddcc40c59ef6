"""Figures: grids, reconstruction strips, curves from a run's log, the trajectory."""

import json

import numpy as np
from PIL import Image

from latentflow.figures import (
    class_grid_labels,
    image_grid,
    save_eval_curve,
    save_grid,
    save_loss_by_time,
    save_loss_curve,
    save_reconstruction_figure,
    save_trajectory,
)


def images(n, h=4, w=4, c=1, value=0):
    return np.full((n, h, w, c), value, dtype=np.uint8)


def test_a_grid_places_images_in_rows_with_a_border():
    tiles = np.stack([np.full((4, 4, 1), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = image_grid(tiles, ncol=3, pad=2)
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (4 + 2) + 2, 1)  # 2 rows, 3 columns, a border around
    assert grid[2, 2, 0] == 10 and grid[2, 2 + 6, 0] == 20 and grid[2 + 6, 2, 0] == 40  # row-major order
    assert grid[2 + 6, 2 + 12, 0] == 255  # the missing sixth tile is blank
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all()


def test_saved_grids_and_strips_are_pngs_of_the_right_size(tmp_path):
    path = save_grid(images(6, c=3, value=7), tmp_path / "g.png", ncol=3, scale=2)
    assert Image.open(path).size == (2 * (3 * 6 + 2), 2 * (2 * 6 + 2))
    strip = save_reconstruction_figure(images(4, value=100), images(4, value=90), tmp_path / "r.png", scale=1)
    array = np.asarray(Image.open(strip))
    assert array.shape == (3 * 6 + 2, 4 * 6 + 2)  # originals, reconstructions, |difference| x4
    assert array[2 * 6 + 2, 2] == 40  # |100 - 90| x 4


def test_class_grid_labels():
    assert class_grid_labels(3, 2) == [0, 0, 1, 1, 2, 2]
    assert class_grid_labels(0, 4) is None  # unconditional: no labels


def test_curves_are_drawn_from_a_runs_log(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [{"event": "step", "step": s, "loss": 1 / s} for s in range(1, 9)]
    records += [
        {
            "event": "epoch",
            "epoch": e,
            "step": 4 * e,
            "loss": 0.5 / e,
            "val_loss": 0.6 / e,
            "loss_by_time": [0.1 * (j + 1) for j in range(10)],
        }
        for e in (1, 2)
    ]
    records += [
        {
            "event": "eval",
            "epoch": e,
            "accuracy": 0.5 + 0.1 * e,
            "references": {"train": {"fd": 1.0 / e, "fd_std": 0.1, "floor": {"fd": 0.2, "n": 100}}},
        }
        for e in (1, 2)
    ]
    log.write_text("\n".join(json.dumps(r) for r in records))
    for draw, name in (
        (save_loss_curve, "loss.png"),
        (save_loss_by_time, "by_time.png"),
        (save_eval_curve, "eval.png"),
    ):
        path = draw(log, tmp_path / name, title="t")
        assert Image.open(path).size[0] > 100
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"event": "step", "step": 1, "loss": 1.0}))
    assert not save_eval_curve(empty, tmp_path / "none.png").exists()  # nothing to draw: no file


def test_the_trajectory_has_one_row_per_sample_and_one_column_per_time(tmp_path):
    frames = [images(3, value=v) for v in (0, 128, 255)]
    path = save_trajectory(frames, [0.0, 0.5, 1.0], tmp_path / "t.png", max_rows=2)
    width, height = Image.open(path).size
    assert width > height  # 3 columns, 2 rows
