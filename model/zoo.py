"""The model zoo table: every vitpipe-registered model, measured, beside its published numbers.

Parameters are counted on the built model; MACs come from :func:`model.flops.count_macs` at batch 1
and the model's default input size (``pretrained_cfg["input_size"]``). Vision papers call MACs
"FLOPs" (Swin's 4.5 G, DeiT's 4.6 G): the column ``GMACs`` is that number. Both are taken on the meta
device (shapes only, no arithmetic: seconds even for the video variants), which gives the same counts as
real tensors (``tests/model/test_zoo.py``); a model with an op that has no meta kernel is counted on real
CPU tensors instead.

The models are registered by :mod:`model` itself (imported before this module); nothing in :mod:`model`
imports this table.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    """Reference numbers for one model.

    Attributes:
        params_m: Parameters in millions (at ``classes`` outputs).
        gmacs: Multiply-accumulates at the default input size, in G (the papers' "GFLOPs").
        top1: ImageNet top-1 (%) where one exists, else ``None``.
        classes: Classifier outputs the parameter count refers to.
        source: Where the numbers come from.
    """

    params_m: float
    gmacs: float
    top1: float | None
    classes: int
    source: str


_SWIN = "timm default_cfgs/README (params, GMACs); Swin README (top-1, IN-1K only)"
_DEIT = "DeiT README (top-1); timm results tables (params, GMACs)"
_FVIT = "derived from the author's code (spec filtervit.md §4; paper tables not public)"

#: Published numbers by vitpipe model name; models without a public reference are absent.
PUBLISHED: dict[str, Published] = {
    "swin_tiny_patch4_window7_224_fused": Published(28.3, 4.51, 81.2, 1000, _SWIN),
    "swin_small_patch4_window7_224_fused": Published(49.6, 8.77, 83.2, 1000, _SWIN),
    "swin_base_patch4_window7_224_fused": Published(87.8, 15.47, 83.5, 1000, _SWIN),
    "swin_large_patch4_window7_224_fused": Published(196.5, 34.53, None, 1000, _SWIN + "; L: 22K only"),
    "deit_tiny_patch16_224_fused": Published(5.72, 1.26, 72.2, 1000, _DEIT),
    "deit_small_patch16_224_fused": Published(22.05, 4.61, 79.9, 1000, _DEIT),
    "deit_base_patch16_224_fused": Published(86.57, 17.58, 81.8, 1000, _DEIT),
    "vit_base_patch16_224_fused": Published(86.57, 17.58, None, 1000, "timm (GMACs as quoted in spec swin.md §9)"),
    "filtervit_xxs": Published(0.947, 1.01, None, 100, _FVIT),
    "filtervit_xs": Published(1.894381, 1.38, 86.08, 100, _FVIT + "; top-1: author's log, IN-100 subset 1"),
    "filtervit_s": Published(4.989, 3.19, None, 100, _FVIT),
    "dropoutvit_xs": Published(1.875556, 1.35, None, 100, _FVIT),
}


@dataclass(frozen=True)
class ZooRow:
    """One measured row of the zoo table."""

    name: str
    input_size: tuple[int, ...]
    classes: int
    params_m: float
    gmacs: float
    published: Published | None
    error: str = ""


def vitpipe_models(pattern: str = "*") -> list[str]:
    """Names registered by vitpipe's own modules (``model.*``), filtered by a shell-style pattern."""
    from timm.models import list_models, model_entrypoint

    return [n for n in list_models() if model_entrypoint(n).__module__.startswith("model.")
            and fnmatch.fnmatch(n, pattern)]


def input_size(cfg: dict) -> tuple[int, ...]:
    """Default input of one sample: (3, H, W), or (3, T, H, W) for video models.

    timm's config has no frame count; it is read from ``num_frames`` or a ``"<T> frames"`` note.
    """
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    frames = cfg.get("num_frames") or next((int(m.group(1)) for note in cfg.get("notes", ()) or ()
                                            if (m := re.search(r"(\d+) frames", str(note)))), 0)
    return (size[0], int(frames), *size[1:]) if frames else size


def measure(name: str) -> ZooRow:
    """Builds ``name`` on the meta device and measures parameters and MACs at its default input size.

    The parameter count is taken at the classifier size of the published number when one exists
    (FilterViT's are at 100 classes), else at the model's default.

    Returns:
        The row; ``error`` holds the message when the model failed to build or run.
    """
    import torch

    from model.factory import count_params, create_model
    from model.flops import count_macs

    pub = PUBLISHED.get(name)
    kwargs = {"num_classes": pub.classes} if pub else {}
    try:
        net = create_model(name, device="meta", **kwargs)  # no weights allocated, no arithmetic
        size = input_size(net.pretrained_cfg)
        classes = int(getattr(net, "num_classes", 0))
        try:
            macs = count_macs(net, torch.empty(1, *size, device="meta"))
        except (NotImplementedError, RuntimeError):  # an op without a meta kernel (data-dependent shapes)
            macs = count_macs(create_model(name, **kwargs), torch.randn(1, *size))
        return ZooRow(name, size, classes, count_params(net) / 1e6, macs / 1e9, pub)
    except Exception as err:  # noqa: BLE001 - one broken model must not hide the rest of the table
        return ZooRow(name, (), 0, float("nan"), float("nan"), pub, f"{type(err).__name__}: {err}")


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if abs(value) >= 0.1 or value == 0 else f"{value:.{digits + 2}f}"


def format_table(rows: list[ZooRow], markdown: bool = True) -> str:
    """The rows as a Markdown table (or aligned plain text)."""
    head = ["model", "input", "classes", "params (M)", "published", "GMACs", "published", "top-1 (published)"]
    lines = []
    for r in rows:
        p = r.published
        size = "×".join(str(s) for s in r.input_size[1:]) or "?"  # T×H×W for video
        lines.append([r.name, size, str(r.classes), _fmt(r.params_m, 3), _fmt(p and p.params_m, 3),
                      _fmt(r.gmacs, 2), _fmt(p and p.gmacs, 2), _fmt(p and p.top1, 1)]
                     if not r.error else [r.name, "error", "", "", "", "", "", r.error[:60]])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out) + "\n"
    widths = [max(len(c) for c in col) for col in zip(head, *lines, strict=True)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
                     for cells in [head, *lines]) + "\n"
