"""Parameters and GMACs of every StructViT paper variant, measured, beside the paper's and the spec's numbers.

Counts run on the meta device (shapes only), so the whole table takes seconds on a CPU:

    python bench/structvit_table.py            # markdown table, as in docs/structvit.md

"Base" is the same network with vanilla attention (``struct_dim=0``): UniFormer. MACs per image at 224² or
per view (video: 16 frames for S, 32 for B), multiply-accumulates as in the papers' "GFLOPs", attention
matmuls included (``model.flops``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import create_model  # noqa: E402
from model.factory import count_params  # noqa: E402
from model.flops import count_macs  # noqa: E402

# name: (paper params M, paper GMACs, spec-predicted GMACs); video GMACs per view = printed total / views
# (K400 ×4 views; SS ×3 views printed in brackets in the docs).
PAPER = {
    "structvit_s_4_2": (23, 3.6, 3.61),
    "structvit_s_4_1": (23, 4.3, 4.25),
    "structvit_s_8_1": (24, 5.4, 5.11),
    "structvit_b_4_2": (51, 8.3, 8.33),
    "structvit_b_4_1": (51, 9.9, 9.93),
    "structvit_b_8_1": (52, 12.0, 12.07),
    "structvit_l_4_1": (103, 15.4, 15.31),
    "structvit_s_4_2_video": (None, 169 / 4, 42.0),
    "structvit_s_4_1_video": (None, 327 / 4, 81.9),
    "structvit_s_8_1_video": (None, 541 / 4, 135.2),
    "structvit_b_4_2_video": (None, 1045 / 4, 260.2),
    "structvit_b_4_1_video": (None, 2658 / 4, 654.8),
}


def measure(name: str) -> tuple[int, int, float, float]:
    """(params, base params, GMACs, base GMACs) of a registered variant."""
    video = name.endswith("video")
    shape = (1, 3, 32 if "_b_" in name else 16, 224, 224) if video else (1, 3, 224, 224)
    x = torch.empty(shape, device="meta")
    net = create_model(name, device="meta")
    base = create_model(name, device="meta", struct_dim=0, kv_stride=1)
    return count_params(net), count_params(base), count_macs(net, x) / 1e9, count_macs(base, x) / 1e9


def main() -> None:
    """Prints the markdown table."""
    print("| variant | params (M) | base (M) | paper (M) | GMACs | base GMACs | paper | spec pred. | vs pred. |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (p_params, p_macs, pred) in PAPER.items():
        params, base, macs, base_macs = measure(name)
        paper_p = "–" if p_params is None else str(p_params)
        print(f"| {name} | {params / 1e6:.2f} | {base / 1e6:.2f} | {paper_p} | {macs:.2f} | {base_macs:.2f} | "
              f"{p_macs:.1f} | {pred:.2f} | {100 * (macs / pred - 1):+.1f} % |")


if __name__ == "__main__":
    main()
