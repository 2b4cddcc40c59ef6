"""``python main.py export``: write a LatentFlowPipeline directory from any checkpoint, run or
export."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, LatentflowError
from ..files import check_output
from ..pipeline import load_pipeline, save_pipeline
from . import say

__all__ = ["export", "main"]


def export(source: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the pipeline of any complete checkpoint, run or export to ``out``."""
    out, source = Path(out), Path(source)
    check_output(out, overwrite, directory=True, only_replaces="model_index.json")
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise LatentflowError(f"--out {out} holds the source {source}; choose another --out")
    pipe, cfg, info = load_pipeline(source, with_info=True)
    if cfg is None:
        raise CheckpointError(f"{source} has no experiment.yaml; it cannot be re-exported")
    return save_pipeline(pipe, out, cfg, {**info, "exported_from": str(source)})


def main(args) -> None:
    out = export(args.checkpoint, args.out, overwrite=args.overwrite)
    say(
        f"exported {args.checkpoint} -> {out}  (load it with LatentFlowPipeline.from_pretrained({str(out)!r}), "
        f"or in plain diffusers with DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True))"
    )
