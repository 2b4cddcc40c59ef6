"""Write experiments/walkthrough.ipynb from the cells below, then execute it in place so the
committed notebook keeps its outputs:

    python experiments/maintainer/make_walkthrough.py     # about 2 minutes on 2 CPU cores
"""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parents[1]

CELLS = [
    (
        "markdown",
        """# latentflow walkthrough

Latent flow matching in five steps, with the public API only: look at what the frozen VAE
keeps of a digit, train a small velocity field for about a minute, sample with and without
classifier-free guidance, follow samples along the ODE path, and score them. Everything runs
offline on a CPU with the bundled MNIST digits and the shipped VAE.

Run it from a checkout: `jupyter lab experiments/walkthrough.ipynb` (with or without
`pip install -e .`).""",
    ),
    (
        "code",
        """%matplotlib inline
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook bars, without ipywidgets
try:
    import latentflow  # noqa: F401  installed (pip install -e .)
except ModuleNotFoundError:  # a checkout without installing: the repository root is one folder up
    sys.path.insert(0, str(Path.cwd().parent))
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, display

from latentflow import (FrozenVAE, LatentFlowPipeline, Runtime, evaluate_model, load_config,
                        reconstruction_check, sample_images, train)

work = Path(tempfile.mkdtemp(prefix="latentflow-walkthrough-"))  # everything this notebook writes


def show(images, rows, title=None):
    \"\"\"uint8 images (N, H, W, C) or PIL images as a grid with `rows` rows.\"\"\"
    images = np.stack([np.asarray(im) for im in images])
    cols = len(images) // rows
    grid = images[: rows * cols].reshape(rows, cols, *images.shape[1:3], -1)
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(rows * images.shape[1], cols * images.shape[2], -1)
    plt.figure(figsize=(cols * 0.6, rows * 0.6))
    plt.imshow(grid.squeeze(-1), cmap="gray")
    plt.axis("off")
    if title:
        plt.title(title)
    plt.show()""",
    ),
    (
        "markdown",
        """## 1. The frozen VAE

Training never sees pixels: each 32×32 digit becomes a 4×8×8 latent (its posterior mean and
standard deviation are cached once). Whatever the decoder cannot rebuild from a latent, no
velocity field can generate, so first check what a round trip through the VAE keeps. Top
rows: test digits; bottom rows: their reconstructions.""",
    ),
    (
        "code",
        """vae = FrozenVAE.from_pretrained("embedded")
print("latent per 32x32 digit:", vae.latent_shape(32))
check = reconstruction_check(num_images=500, out=work / "reconstruction.png")
print({k: round(v, 3) for k, v in check.items() if isinstance(v, float)})
display(Image(filename=work / "reconstruction.png", width=480))""",
    ),
    (
        "markdown",
        """## 2. Train for about a minute

The default experiment with fewer epochs: a DiT on the 4 500 training digits, the σ_min
conditional flow matching loss with logit-normal times, label dropout for guidance, an EMA of
the weights. `train` returns the run directory: checkpoints, figures, the loss log and a
`LatentFlowPipeline` export.

A minute buys about 840 optimizer steps: the digits come out recognisable but rough (the
score in step 5 says how rough). `python main.py` trains the same model for 50 epochs, about
four minutes here, to 98–99 % class accuracy.""",
    ),
    (
        "code",
        """cfg = load_config(overrides=["name=walkthrough", "train.epochs=12", "train.log_every=200",
                             "train.log_with=none"])
run_dir = train(cfg, Runtime(output_dir=work, cache_dir=work / "cache"))
display(Image(filename=run_dir / "figures" / "loss.png", width=480))""",
    ),
    (
        "markdown",
        """## 3. Sample with and without guidance

The export loads like any diffusers pipeline. Four of each digit from the same noise: plain
conditional sampling (guidance scale 1), classifier-free guidance at 1.5 (the default), and
unconditional samples from the null label.""",
    ),
    (
        "code",
        """pipe = LatentFlowPipeline.from_pretrained(run_dir / "export")
labels = [d for d in range(10) for _ in range(4)]
for scale in (1.0, 1.5):
    out = pipe(class_labels=labels, guidance_scale=scale, generator=torch.Generator().manual_seed(0))
    show(out.images, rows=10, title=f"guidance scale {scale}")
out = pipe(num_images=40, generator=torch.Generator().manual_seed(0))
show(out.images, rows=10, title="unconditional")""",
    ),
    (
        "markdown",
        """## 4. Along the ODE path

`sample_images` is what the pipeline calls. With `trajectory_times` it also decodes x_t on
the way: t = 0 is Gaussian noise, t = 1 a digit. One row per sample.""",
    ),
    (
        "code",
        """result = sample_images(pipe.transformer, pipe.frozen_vae(), pipe.latent_shape, labels=list(range(10)),
                       solver="euler", steps=8, cfg_scale=1.5, generator=torch.Generator().manual_seed(1),
                       trajectory_times=9)
frames = np.stack(result.trajectory, axis=1)  # (samples, times, H, W, C)
show(frames.reshape(-1, *frames.shape[2:]), rows=10,
     title="t = " + "  ".join(f"{t:.2f}" for t in result.times))""",
    ),
    (
        "markdown",
        """## 5. Score it

`evaluate_model` samples again and compares with real digits: the accuracy of the shipped
digit classifier on the samples, and the Fréchet distance in its feature space to the MNIST
test and training sets, beside the floor: the distance the digits this model was trained on
reach at the same sample size.""",
    ),
    (
        "code",
        """report = evaluate_model(run_dir / "export", num_samples=1000)
print(report["summary"])""",
    ),
]


def main():
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source in CELLS:
        maker = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(maker(source))
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    path = HERE / "walkthrough.ipynb"
    nbformat.write(nb, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
