"""Your own colour images, offline: train a colour VAE on a folder, then a flow on its latents.

    python experiments/colour_folder.py                        # a generated folder of coloured shapes
    python experiments/colour_folder.py --folder photos/       # class folders of your own (photos/cat/*.jpg ...)
    python experiments/colour_folder.py --vae-epochs 60 --flow-epochs 60 --image-size 32

The same two steps on the command line:

    python main.py train-vae --set data.source=folder --set data.path=DIR --set data.image_size=32
    python main.py --set data.source=folder --set data.path=DIR --set data.image_size=32 \\
        --set vae.pretrained=runs/default-vae+HASH-TIME/vae

Without ``--folder`` it draws 100 circles, squares and triangles per class (random colours,
sizes, positions and pale backgrounds) into ``<output-dir>/shapes-<size>px``. It prints
the VAE's held-out PSNR and SSIM and where the flow's grids are.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentflow import load_config
from latentflow.commands import train as train_command
from latentflow.commands.train_vae import train_vae
from latentflow.data.shapes import write_shapes_folder
from latentflow.training import RunOptions
from latentflow.training.vae import VAEOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", help="class folders of images (default: generated shapes)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--vae-epochs", type=int, default=40)
    parser.add_argument("--flow-epochs", type=int, default=40)
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    out = Path(args.output_dir)
    folder = Path(args.folder) if args.folder else out / f"shapes-{args.image_size}px"
    if not args.folder and not folder.is_dir():
        write_shapes_folder(folder, per_class=100, size=args.image_size, seed=0)
        print(f"drew 300 shapes into {folder}")
    data = [
        "data.source=folder",
        f"data.path={folder}",
        "data.max_items=null",
        f"data.image_size={args.image_size}",
        "data.skip_bad_images=true",
    ]
    vae_cfg = load_config("default", [*data, f"autoencoder.epochs={args.vae_epochs}", *args.overrides])
    report = train_vae(vae_cfg, VAEOptions(output_dir=out, overrides=tuple(data)))
    flow = [*data, f"vae.pretrained={report['out']}", f"train.epochs={args.flow_epochs}", *args.overrides]
    run = train_command.train(load_config("default", flow), RunOptions(output_dir=out, overrides=tuple(flow)))
    print(f"flow: {run} (grids in {run / 'figures'}, pipeline in {run / 'export'})")


if __name__ == "__main__":
    main()
