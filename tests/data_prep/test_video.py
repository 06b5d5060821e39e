"""Video prep: Kinetics / SSv2 / Diving48 / videolist layouts, re-encoding, bad videos, readers."""

from __future__ import annotations

import csv
import io
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.format import Counts, DatasetInfo, load_dataset_info
from data_prep.plan import Plan
from data_prep.shard import merge, run_plan
from data_prep.verify import verify_dataset
from data_prep.video import VideoOptions, reencode_video
from data_prep.video_sources import scan_diving48, scan_kinetics, scan_ssv2, scan_videolist

FPS_OUT = 8
OPTS = {"fps": FPS_OUT, "short_side": 32, "keyint": 4}


def make_video(path: Path, codec: str = "libx264", n: int = 12, fps: int = 24, w: int = 64, h: int = 48,
               pts_ms: list[int] | None = None, rotation: int | None = None, fmt: str | None = None) -> Path:
    """A tiny clip: frame i has red = 20 i and a white 8x8 marker in the top-left corner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=fmt) as c:
        st = c.add_stream(codec, rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        if pts_ms is not None:  # variable frame rate: explicit millisecond timestamps
            st.time_base = st.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            st.set_display_rotation(rotation)
        for i in range(n):
            arr = np.zeros((h, w, 3), np.uint8)
            arr[..., 0] = (20 * i) % 256
            arr[:8, :8] = 255
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for p in st.encode(frame):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    return path


def make_audio_only(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as c:
        st = c.add_stream("aac", rate=16000)
        for i in range(4):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, i * 1024
            for p in st.encode(fr):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    return path


def make_zero_frames(path: Path, tmp: Path) -> Path:
    """A webm with a VP9 stream header but no frame (cut before its first block)."""
    data = make_video(tmp / "full.webm", codec="libvpx-vp9").read_bytes()
    cluster = data.index(bytes.fromhex("1F43B675"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: data.index(b"\xa3", cluster)])
    return path


KINETICS_BAD = {  # youtube id -> (maker, reason fragment)
    "truncated00": (lambda p, t: p.write_bytes(make_video(t / "t.mp4").read_bytes()[:600]), "cannot decode"),
    "audioonly00": (lambda p, t: make_audio_only(p), "no video stream"),
    "zeroframes0": (lambda p, t: make_zero_frames(p.with_suffix(".webm"), t), "no frames"),
}


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Kinetics layout: CSVs + <split>/<label>/<ytid>_<start:06d>_<end:06d>.mp4, with bad videos."""
    root = tmp_path_factory.mktemp("k400")
    tmp = tmp_path_factory.mktemp("k400tmp")
    rows = {"train": [], "validate": []}
    labels = ["abseiling", "air drumming"]  # a space in a label, as in Kinetics
    k = 0
    for split, n in (("train", 3), ("validate", 1)):
        for label in labels:
            for _ in range(n):
                k += 1
                ytid = f"vid{k:08d}"
                rows[split].append([label, ytid, 10, 20, split])
                make_video(root / "videos" / split / label / f"{ytid}_000010_000020.mp4")
    rows["train"].append(["abseiling", "variablefr0", 0, 10, "train"])
    make_video(root / "videos/train/abseiling/variablefr0_000000_000010.mp4", n=12,
               pts_ms=[0, 30, 50, 120, 130, 300, 310, 400, 600, 650, 700, 900])
    rows["train"].append(["air drumming", "rotated0000", 0, 10, "train"])
    make_video(root / "videos/train/air drumming/rotated0000_000000_000010.mp4", rotation=90)
    for ytid, (make, _) in KINETICS_BAD.items():
        rows["train"].append(["abseiling", ytid, 0, 10, "train"])
        make(root / "videos/train/abseiling" / f"{ytid}_000000_000010.mp4", tmp)
    rows["train"].append(["abseiling", "missing0000", 0, 10, "train"])  # annotated, never downloaded
    files = []
    for split, rs in rows.items():
        path = root / f"{split}.csv"
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([["label", "youtube_id", "time_start", "time_end", "split"], *rs])
        files.append(path)
    return root, files


def _prep(plan: Plan, out: Path, codec: str) -> DatasetInfo:
    run_plan(plan, out, VideoOptions(codec=codec, **OPTS), workers=1, threads=2, settings={"max_failure_rate": 0.5})
    return merge(out)


@pytest.fixture(scope="module")
def k_vp9(kinetics: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DatasetInfo]:
    root, files = kinetics
    out = tmp_path_factory.mktemp("k_vp9")
    plan = scan_kinetics(files, root / "videos", shard_size=3, seed=0, options={"codec": "vp9", **OPTS})
    return out, _prep(plan, out, "vp9")


def test_kinetics_counts_and_quarantine(k_vp9: tuple[Path, DatasetInfo]) -> None:
    out, info = k_vp9
    assert info.kind == "video" and list(info.classes) == ["abseiling", "air drumming"]
    assert info.counts == Counts(inputs=14, written=10, quarantined=4)
    assert info.splits["train"].num_samples == 8 and info.splits["val"].num_samples == 2
    q = {r["source"].split("/")[-1][:11]: r["reason"] for r in pq.read_table(out / "quarantine.parquet").to_pylist()}
    for ytid, (_, reason) in KINETICS_BAD.items():
        assert reason in q[ytid], (ytid, q[ytid])
    assert q["missing0000"] == "video file not found"


def test_kinetics_manifest_video_fields(k_vp9: tuple[Path, DatasetInfo]) -> None:
    out, _ = k_vp9
    rows = {r["source"].split("/")[-1][:11]: r for r in pq.read_table(out / "train.parquet").to_pylist()}
    normal = rows["vid00000001"]
    assert (normal["format"], normal["fps"], normal["frames"], normal["duration"]) == ("vp9", 8.0, 4, 0.5)
    assert (normal["width"], normal["height"]) == (42, 32)
    assert rows["variablefr0"]["frames"] == 8  # 0.9 s + last frame, resampled to 8 fps
    assert (rows["rotated0000"]["width"], rows["rotated0000"]["height"]) == (32, 42)
    assert "rotated [90]" in rows["rotated0000"]["note"]
    assert verify_dataset(out, decode_fraction=1.0) == []


def test_webdataset_reads_video_shards(k_vp9: tuple[Path, DatasetInfo]) -> None:
    import webdataset as wds

    out, info = k_vp9
    urls = [str(out / "train" / s.name) for s in info.splits["train"].shards]
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        assert int(sample["cls"]) == meta["label"] == info.classes.index(meta["class_id"])
        with av.open(io.BytesIO(sample["webm"])) as c:
            assert sum(1 for _ in c.decode(video=0)) == meta["frames"]
        n += 1
    assert n == 8


def test_dali_cpu_reads_vp9_shards_with_index(k_vp9: tuple[Path, DatasetInfo]) -> None:
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    out, info = k_vp9
    shards = info.splits["train"].shards
    rows = pq.read_table(out / "train.parquet").to_pylist()

    @dali.pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():  # type: ignore[no-untyped-def]
        video, lbl = fn.readers.webdataset(
            paths=[str(out / "train" / s.name) for s in shards],
            index_paths=[str(out / "train" / s.index) for s in shards],
            ext=["webm", "lbl"], dtypes=[types.UINT8, types.INT64], missing_component_behavior="error", name="r")
        return fn.decoders.video(video, device="cpu"), lbl

    p = pipe()
    p.build()
    assert p.epoch_size("r") == len(rows) == 8
    got = []
    while len(got) < len(rows):
        frames, lbls = p.run()
        for i in range(len(lbls)):
            got.append((np.asarray(frames[i]).shape, int(np.asarray(lbls[i]).reshape(-1)[0])))
    assert got[: len(rows)] == [((r["frames"], r["height"], r["width"], 3), r["label"]) for r in rows]


def test_h264_and_jpeg_frames_and_determinism(kinetics: tuple[Path, list[Path]], tmp_path: Path) -> None:
    import webdataset as wds

    root, files = kinetics
    outs = {}
    for codec in ("h264", "jpeg"):
        plan = scan_kinetics(files, root / "videos", shard_size=3, seed=0, options={"codec": codec, **OPTS})
        outs[codec] = _prep(plan, tmp_path / codec, codec)
    assert [r["format"] for r in pq.read_table(tmp_path / "h264" / "train.parquet").to_pylist()][0] == "h264"
    first = str(tmp_path / "jpeg" / "train" / outs["jpeg"].splits["train"].shards[0].name)
    sample = next(iter(wds.WebDataset(first, shardshuffle=False)))
    frames = sorted(k for k in sample if k.endswith(".jpg"))
    assert frames[0] == "f0000.jpg" and len(frames) == json.loads(sample["json"])["frames"]
    plan = scan_kinetics(files, root / "videos", shard_size=3, seed=0, options={"codec": "h264", **OPTS})
    _prep(plan, tmp_path / "again", "h264")
    a, b = tmp_path / "h264", tmp_path / "again"
    for p in sorted(a.rglob("*.tar")):
        assert p.read_bytes() == (b / p.relative_to(a)).read_bytes(), p


def test_reencode_window_keyint_rotation(tmp_path: Path) -> None:
    src = make_video(tmp_path / "long.mp4", n=48)  # 2 s at 24 fps
    enc = reencode_video(src, 0.5, 1.5, VideoOptions(codec="h264", fps=10, short_side=32, keyint=4))
    assert enc.frames == 10 and enc.duration == 1.0
    with av.open(io.BytesIO(enc.components[0][1])) as c:
        keys = [f.key_frame for f in c.decode(video=0)]
    assert [i for i, k in enumerate(keys) if k] == [0, 4, 8]
    rot = make_video(tmp_path / "rot.mp4", rotation=90)
    enc = reencode_video(rot, None, None, VideoOptions(codec="jpeg", fps=8, short_side=1000))
    img = np.asarray(Image.open(io.BytesIO(enc.components[0][1])))
    assert img.shape[:2] == (64, 48)
    assert img[-4, 3].min() > 200 and img[3, 3].max() < 100  # top-left marker turned counter-clockwise


def test_full_videos_cut_to_window(tmp_path: Path) -> None:
    make_video(tmp_path / "v" / "abcdefghijk.mp4", n=72)  # 3 s
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("label,youtube_id,time_start,time_end,split\nx,abcdefghijk,1.0,2.5,train\n")
    plan = scan_kinetics([csv_path], tmp_path / "v", shard_size=3, seed=0, options={}, full_videos=True)
    (s,) = plan.splits["train"]
    assert (s.start, s.end) == (1.0, 2.5)
    assert reencode_video(s.path, s.start, s.end, VideoOptions(fps=10)).frames == 15


def test_ssv2_layout(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text(json.dumps({"Pushing something": "1", "Holding something": "0"}))
    (tmp_path / "train.json").write_text(json.dumps([
        {"id": "11", "template": "Holding [something]", "label": "holding a cup", "placeholders": ["a cup"]},
        {"id": "12", "template": "Pushing [something]", "label": "pushing a box", "placeholders": ["a box"]}]))
    (tmp_path / "validation.json").write_text(json.dumps([{"id": "13", "template": "Pushing [something]"}]))
    for i in (11, 12, 13):
        make_video(tmp_path / "videos" / f"{i}.webm", codec="libvpx-vp9", n=6)
    plan = scan_ssv2(tmp_path / "labels.json", {"train": tmp_path / "train.json", "val": tmp_path / "validation.json"},
                     tmp_path / "videos", shard_size=2, seed=0, options={"codec": "vp9", **OPTS})
    assert plan.classes == ["Holding something", "Pushing something"]
    assert sorted((s.source, s.label) for s in plan.splits["train"]) == [("11.webm", 0), ("12.webm", 1)]
    info = _prep(plan, tmp_path / "out", "vp9")
    assert info.counts == Counts(inputs=3, written=3, quarantined=0)


def test_diving48_and_videolist_layouts(tmp_path: Path) -> None:
    make_video(tmp_path / "rgb" / "-mmq0PT-u8k_00155.mp4", n=6)
    make_video(tmp_path / "rgb" / "zz_00001.mp4", n=6)
    (tmp_path / "train.json").write_text(json.dumps([
        {"vid_name": "-mmq0PT-u8k_00155", "label": 2, "start_frame": 0, "end_frame": 5},
        {"vid_name": "zz_00001", "label": 0, "start_frame": 0, "end_frame": 5}]))
    (tmp_path / "vocab.json").write_text(json.dumps([["Back", "15som", "NoTwis", "PIKE"]] * 3))
    plan = scan_diving48({"train": tmp_path / "train.json"}, tmp_path / "rgb", shard_size=4, seed=0, options={},
                         vocab=tmp_path / "vocab.json")
    assert plan.classes == ["00", "01", "02"] and plan.class_names[0] == "Back / 15som / NoTwis / PIKE"
    assert sorted(s.label for s in plan.splits["train"]) == [0, 2]

    make_video(tmp_path / "gym" / "clip with space.mp4", n=6)
    (tmp_path / "train.txt").write_text("gym/clip with space.mp4 1\n# comment\nrgb/zz_00001.mp4 0 0.1 0.2\n"
                                        "gym/gone.mp4 1\n")
    (tmp_path / "classes.txt").write_text("vault\nbeam\n")
    plan = scan_videolist({"train": tmp_path / "train.txt"}, tmp_path, shard_size=4, seed=0, options={},
                          class_file=tmp_path / "classes.txt")
    assert plan.classes == ["vault", "beam"]
    got = sorted((s.source, s.label, s.start, s.end) for s in plan.splits["train"])
    assert got == [("gym/clip with space.mp4", 1, None, None), ("rgb/zz_00001.mp4", 0, 0.1, 0.2)]
    assert plan.prequarantined == {"train": [("gym/gone.mp4", "video file not found")]}


def test_video_cli_end_to_end(kinetics: tuple[Path, list[Path]], tmp_path: Path) -> None:
    from vitpipe.prep import main

    root, files = kinetics
    args = ["prep", "kinetics", "--annotations", *map(str, files), "--videos", str(root / "videos"), "--out",
            str(tmp_path), "--codec", "vp9", "--fps", "8", "--short-side", "32", "--keyint", "4", "--shard-size", "4",
            "--workers", "2", "--max-failure-rate", "0.5"]
    assert main(args) == 0
    info = load_dataset_info(tmp_path)
    assert info.options["codec"] == "vp9" and info.counts.written == 10
    assert main(["prep", "verify", str(tmp_path)]) == 0
