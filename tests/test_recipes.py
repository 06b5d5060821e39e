"""The run recipes under jobs/: every one loads through the real config loader and says what its paper says.

Video recipes must resolve ``data.video`` to a :class:`~pipeline.data.video.VideoSpec` with the spec's clip length,
sampling, flip and test views (structvit.md §6.2-6.5); the ImageNet recipes trained with the DeiT recipe must
mix (mixup and CutMix on); and no ``TODO`` comment may still ask for a key the config has now.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import JobCfg, VideoCfg
from pipeline.config_io import dump_toml, load_config
from pipeline.data.sample_transforms import randaugment, train_transform
from pipeline.data.video import video_spec_of

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "jobs").rglob("*.toml"))


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT / "jobs"))


#: Video recipes → what their VideoSpec must be (structvit.md §6.2, §6.3, §6.5; test views frames×crops×clips).
VIDEO = {
    "structvit/structvit_s41_k400_cls_1x8.toml": dict(frames=16, sampling="dense", stride=4, flip=True,
                                                      num_clips=4, spatial_crops=1),
    "structvit/structvit_b41_k400_cls_4x8.toml": dict(frames=32, sampling="dense", stride=4, flip=True,
                                                      num_clips=4, spatial_crops=1),
    "structvit/structvit_s41_ssv2_cls_1x8.toml": dict(frames=16, sampling="segment", flip=False,
                                                      num_clips=1, spatial_crops=3),
    "structvit/structvit_b41_ssv2_cls_4x8.toml": dict(frames=32, sampling="segment", flip=False,
                                                      num_clips=1, spatial_crops=3),
    "structvit/structvit_b41_ssv1_cls_4x8.toml": dict(frames=32, sampling="segment", flip=False,
                                                      num_clips=1, spatial_crops=3),
    "structvit/structvit_b41_diving48_cls_4x8.toml": dict(frames=32, sampling="segment", flip=False,
                                                          num_clips=1, spatial_crops=3),
    "structvit/structvit_b41_gym288_cls_4x8.toml": dict(frames=32, sampling="segment", flip=False,
                                                        num_clips=1, spatial_crops=3),
}

#: ImageNet recipes whose paper trains with mixup 0.8 + CutMix 1.0, RandAugment m9 and erasing 0.25
#: (DeiT / UniFormer defaults for StructViT, spec §6.1; the official Swin config, swin.md §2).
DEIT_STYLE = [
    "structvit/structvit_s41_in1k_cls_1x8.toml",
    "structvit/structvit_b41_in1k_cls_1x8.toml",
    "structvit/structvit_l41_in1k_cls_2x8.toml",
    "swin/swin_t_in1k_cls_1x8.toml",
    "swin/swin_s_in1k_cls_1x8.toml",
    "swin/swin_b_in1k_cls_1x8.toml",
]

#: Video recipes that mix and erase: MViT's K400 recipe, and the S model on SSv2 (minus flips, spec §6.3).
#: The B models on SS, Diving-48 and FineGym use "random cropping only" (paper §4.1).
VIDEO_MIXING = {"structvit/structvit_s41_k400_cls_1x8.toml", "structvit/structvit_b41_k400_cls_4x8.toml",
                "structvit/structvit_s41_ssv2_cls_1x8.toml"}

#: Words a TODO may no longer use: the config has keys for them (data.randaugment, color_jitter, reprob,
#: mixup, cutmix, and data.video for clips and frames).
SETTLED = re.compile(r"randaugment|rand-m\d|mixup|cutmix|random erasing|erasing|colou?r jitter|num_frames|"
                     r"video input|video loader|clip sampling", re.IGNORECASE)


def _load(rel: str) -> JobCfg:
    return load_config(ROOT / "jobs" / rel)


def _todo_blocks(text: str) -> list[str]:
    """Each comment holding ``TODO``, joined with the ``#   `` continuation lines under it."""
    blocks: list[list[str]] = []
    inside = False
    for line in text.splitlines():
        comment = line[line.index("#"):] if "#" in line else ""
        if "TODO" in comment:
            blocks.append([comment])
            inside = True
        elif inside and line.startswith("#   "):
            blocks[-1].append(line)
        else:
            inside = False
    return ["\n".join(block) for block in blocks]


def test_the_recipe_tables_name_existing_files() -> None:
    known = {_id(p) for p in RECIPES}
    assert len(known) >= 18
    assert set(VIDEO) <= known and set(DEIT_STYLE) <= known and VIDEO_MIXING <= set(VIDEO)


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, JobCfg)
    dumped = tmp_path / "config.toml"
    dumped.write_text(dump_toml(cfg))
    assert load_config(dumped) == cfg  # the resolved config is itself a recipe


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_video_table_only_in_video_recipes(path: Path) -> None:
    assert (load_config(path).data.video != VideoCfg()) == (_id(path) in VIDEO)


@pytest.mark.parametrize("rel", sorted(VIDEO))
def test_video_recipe_builds_its_clip_spec(rel: str) -> None:
    cfg = _load(rel)
    spec = video_spec_of(cfg.data)
    want = VIDEO[rel]
    got = {key: getattr(spec, key) for key in want if key != "stride"}
    assert got == {k: v for k, v in want.items() if k != "stride"}
    if want["sampling"] == "dense":
        assert spec.stride == want["stride"]
    assert spec.img_size == cfg.data.img_size == 224
    assert spec.train_crop == "rrc" and spec.scale == (0.08, 1.0)
    assert spec.flip == (cfg.data.hflip > 0)  # the image key and the clip key agree
    # The first comment line names the clip length: "..., 32 frames × 224², ...".
    first = (ROOT / "jobs" / rel).read_text().splitlines()[0]
    assert int(re.search(r"(\d+) frames ×", first).group(1)) == spec.frames
    assert cfg.model.name.endswith("_video")


@pytest.mark.parametrize("rel", sorted(VIDEO))
def test_video_recipe_augmentation(rel: str) -> None:
    d = _load(rel).data
    if rel in VIDEO_MIXING:
        assert (d.mixup, d.cutmix, d.mixup_switch_prob, d.reprob) == (0.8, 1.0, 0.5, 0.25)
        assert d.randaugment == "rand-m7-n4-mstd0.5-inc1"
    else:
        assert (d.mixup, d.cutmix, d.reprob, d.randaugment) == (0.0, 0.0, 0.0, "")


@pytest.mark.parametrize("rel", DEIT_STYLE)
def test_deit_style_recipes_mix_and_augment(rel: str) -> None:
    d = _load(rel).data
    assert d.mixup > 0 and d.cutmix > 0
    assert (d.mixup, d.cutmix, d.mixup_prob, d.mixup_switch_prob, d.reprob) == (0.8, 1.0, 1.0, 0.5, 0.25)
    assert d.randaugment == "rand-m9-mstd0.5-inc1" and d.color_jitter == 0.4
    assert d.video == VideoCfg()
    train_transform(d)  # the real image transform builds (RandAugment parsed by timm)


def test_filtervit_recipes_do_not_mix() -> None:
    for path in sorted((ROOT / "jobs" / "filtervit").glob("*.toml")):
        d = load_config(path).data
        assert (d.mixup, d.cutmix, d.reprob, d.randaugment) == (0.0, 0.0, 0.0, ""), path.name  # quirk 14


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_randaugment_strings_parse(path: Path) -> None:
    d = load_config(path).data
    if d.randaugment:
        randaugment(d.randaugment, d.img_size, d.mean)


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_colour_jitter_beside_randaugment_is_marked_inactive(path: Path) -> None:
    d = load_config(path).data
    if d.randaugment and d.color_jitter > 0:
        line = next(x for x in path.read_text().splitlines() if x.startswith("color_jitter"))
        assert "inactive" in line, line


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_no_todo_for_a_key_that_exists(path: Path) -> None:
    stale = [block for block in _todo_blocks(path.read_text()) if SETTLED.search(block)]
    assert not stale, "\n\n".join(stale)


def test_todo_blocks_are_found() -> None:
    """The TODO scanner sees continuation lines (so the check above is not vacuous)."""
    text = "# TODO(config): one\n#   mixup two\n[data]\nx = 1  # TODO later\n# other\n"
    assert _todo_blocks(text) == ["# TODO(config): one\n#   mixup two", "# TODO later"]
    assert any(SETTLED.search(b) for b in _todo_blocks(text))
