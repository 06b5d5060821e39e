"""``vitpipe viz``: pictures of what a model does; ``viz masks`` draws FilterViT's filter masks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vitpipe.errors import UserError

_MASKS_EPILOG = """\
examples:
  vitpipe viz masks runs/filtervit-in100 photos/ --out masks/      a run directory (config.toml + final/)
  vitpipe viz masks model.safetensors photos/ --model filtervit_xs --out masks/
  vitpipe viz masks none photos/ --model filtervit_xs              random weights (a smoke test)

For every image: <stem>-masks.png (the crop, then per filter block the continuous score and the
selected top-K pixels) and one PNG per overlay, <stem>-L<i>-<H>-score.png and <stem>-L<i>-<H>-top<K>.png.
"""

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def add_viz_parser(sub: Any, formatter: Any) -> None:
    """Adds ``vitpipe viz`` and its ``masks`` subcommand."""
    p = sub.add_parser("viz", help="pictures of a model (FilterViT filter masks)", formatter_class=formatter,
                       description="Render pictures of what a model does.")
    viz_sub = p.add_subparsers(dest="viz_command", metavar="WHAT", required=True)
    m = viz_sub.add_parser("masks", help="FilterViT/DropoutViT filter masks as PNG overlays", epilog=_MASKS_EPILOG,
                           formatter_class=formatter,
                           description="Run a FilterViT or DropoutViT on a folder of images (eval mode, CPU) and "
                                       "save, per filter block, the continuous filter score and the selected top-K "
                                       "pixels as overlays on the input crop.")
    m.add_argument("checkpoint", help="run directory, weights file (.safetensors/.pt), or 'none' for random weights")
    m.add_argument("images", help="folder of images (jpg, png, ...)")
    m.add_argument("--model", help="model name (default: the run's model.name)")
    m.add_argument("--out", default="masks", help="output folder (default: %(default)s)")
    m.add_argument("--limit", type=int, default=0, help="at most N images (default: all)")
    p.set_defaults(func=run_viz_command)


def _resolve(args: argparse.Namespace) -> tuple[str, Path | None, dict[str, Any]]:
    ckpt = Path(args.checkpoint)
    if args.checkpoint == "none":
        if not args.model:
            raise UserError("--model is needed with random weights")
        return args.model, None, {}
    if ckpt.is_dir():
        from pipeline.config_io import load_config

        if not (ckpt / "config.toml").is_file():
            raise UserError(f"{ckpt} is not a run directory: no config.toml")
        cfg = load_config(ckpt / "config.toml")
        return args.model or cfg.model.name, ckpt / "final" / "model.safetensors", dict(cfg.model.kwargs)
    if not args.model:
        raise UserError("--model is needed with a weights file")
    return args.model, ckpt, {}


def run_viz_command(args: argparse.Namespace) -> int:
    """Builds the model, loads the weights strictly and writes the mask pictures."""
    import torch

    from model.factory import create_model
    from model.viz.filtervit import save_filter_masks

    name, weights, kwargs = _resolve(args)
    folder = Path(args.images)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)[: args.limit or None]
    if not paths:
        raise UserError(f"no images in {folder}")
    state = None
    if weights is not None:
        if not weights.is_file():
            raise UserError(f"weights {weights} not found")
        state = _load_state(weights)
        kwargs["num_classes"] = state["head.weight"].shape[0] if "head.weight" in state else 0
    net = create_model(name, **kwargs)
    if state is not None:
        net.load_state_dict(state)
    if not any(hasattr(m, "last_index") for m in net.modules()):
        raise UserError(f"{name} has no filter blocks (FilterViT/DropoutViT only)")
    with torch.no_grad():
        written = save_filter_masks(net, paths, Path(args.out))
    sys.stdout.write(f"wrote {len(written)} PNG files for {len(paths)} images to {args.out}\n")
    return 0


def _load_state(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state.get("state_dict", state))
