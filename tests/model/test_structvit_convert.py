"""Image -> video inflation of StructViT weights; the attention-map PNG."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model import create_model
from model.structvit_convert import inflate_state_dict, load_inflated


def test_inflated_model_loads_and_every_conv_matches_on_a_static_clip() -> None:
    torch.manual_seed(0)
    image = create_model("structvit_tiny_4_1", num_classes=10)
    video = create_model("structvit_tiny_4_1_video", num_classes=7)
    assert load_inflated(video, image.state_dict()) == ["head.weight", "head.bias"]
    convs_2d = dict(image.named_modules())
    checked = 0
    for name, conv3 in video.named_modules():
        if not isinstance(conv3, nn.Conv3d):
            continue
        conv2 = convs_2d[name]
        torch.testing.assert_close(conv3.weight.sum(2), conv2.weight, rtol=1e-6, atol=1e-7)
        # A temporally constant clip: away from the temporal borders the 3-D conv gives the 2-D response.
        frame = torch.randn(1, conv2.in_channels, 6, 6)
        clip = frame.unsqueeze(2).expand(-1, -1, 8, -1, -1)
        out3, out2 = conv3(clip), conv2(frame)
        kt, st, pt = conv3.kernel_size[0], conv3.stride[0], conv3.padding[0]
        keep = [t for t in range(out3.shape[2]) if st * t - pt >= 0 and st * t - pt + kt <= clip.shape[2]]
        interior = out3[:, :, keep]
        torch.testing.assert_close(interior, out2.unsqueeze(2).expand_as(interior), rtol=1e-5, atol=1e-5)
        checked += 1
    attn = video.stages[2].blocks[0].attn
    assert attn.k_conv.weight.shape[2:] == (3, 3, 3) and checked > 10


def test_mismatched_sizes_fail_loudly() -> None:
    image = create_model("structvit_tiny_4_1").state_dict()
    video = create_model("structvit_tiny_4_1_video", struct_dim=8)
    with pytest.raises(ValueError, match="cannot inflate"):
        inflate_state_dict(image, video)


def test_attention_png(tmp_path) -> None:  # noqa: ANN001
    from model.viz.structvit import render_attention, structural_attention

    torch.manual_seed(0)
    net = create_model("structvit_tiny_4_2")
    image = torch.randn(3, 64, 64)
    merged, per_d, token = structural_attention(net, image, (40, 20))
    assert merged.shape == (4, 4) and per_d.shape == (4, 2, 2) and token == (2, 1)
    torch.testing.assert_close(per_d.sum(), torch.tensor(2.0))  # 2 heads, each a softmax over D·N′
    img = render_attention(net, image, (40, 20))
    img.save(tmp_path / "attn.png")
    assert img.size[0] > img.size[1] > 100 and (tmp_path / "attn.png").stat().st_size > 1000
