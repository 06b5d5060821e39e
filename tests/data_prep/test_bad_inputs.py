"""The bad-input corpus: every kind of odd input, made here with real codecs, through a real prep run.

For each input the test knows the outcome: written (and the manifest note that says how it was
converted) or quarantined (and the reason); ``inputs = written + quarantined``; and both loaders, the
``wds`` backend's PIL decode and DALI's CPU image decoder (the op the ``dali`` backend runs), decode
every written sample to the manifest's shape and, for lossless payloads, to the same values. The
corpus extends the bad inputs of ``test_images_scale`` (truncated, empty, not an image, bomb, CMYK,
greyscale, PNG named .JPEG), whose makers it reuses.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from data_prep.imagenet import build_image_plan
from data_prep.images import ImageOptions
from data_prep.loading import SourceError, read_source
from data_prep.shard import merge, run_plan
from tests.data_prep.test_images_scale import BAD, CONVERTED

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("c0", "c1")
H, W = 30, 60


def _gradient(h: int = H, w: int = W) -> np.ndarray:
    """A smooth RGB picture whose orientation is unambiguous (JPEG keeps it well)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], -1).astype(np.uint8)


def _save(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _grey16() -> np.ndarray:
    return np.linspace(1000, 60000, H * W).reshape(H, W).astype(np.uint16)


def _rgb16() -> np.ndarray:
    return (np.random.default_rng(3).integers(0, 65536, (H, W, 3))).astype(np.uint16)


def _rgb16_png() -> bytes:
    """A 16-bit RGB PNG, encoded by FFmpeg's PNG encoder (PIL cannot write one)."""
    import av

    frame = av.VideoFrame.from_ndarray(_rgb16().astype("<u2"), format="rgb48le").reformat(format="rgb48be")
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = W, H, "rgb48be"
    return b"".join(bytes(p) for p in [*codec.encode(frame), *codec.encode(None)])


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(_gradient()), "JPEG", quality=95, exif=exif.tobytes())


def _palette_png() -> bytes:
    img = Image.fromarray(_gradient()).quantize(16)
    return _save(img, "PNG", transparency=3)


def _alpha(mode: str) -> bytes:
    rng = np.random.default_rng(4)
    channels = 2 if mode == "LA" else 4
    return _save(Image.fromarray(rng.integers(0, 256, (H, W, channels), dtype=np.uint8), mode), "PNG")


#: name -> (maker, note fragments that the manifest row must carry, stored format).
WRITTEN: dict[str, tuple[Callable[[], bytes], tuple[str, ...], str]] = {
    "grey16.png": (lambda: _save(Image.fromarray(_grey16()), "PNG"), ("grayscale", "16-bit->8-bit (>>8)"), "png"),
    "rgb16.png": (_rgb16_png, ("16-bit->8-bit (>>8)",), "png"),
    "grey16.tif": (lambda: _save(Image.fromarray(_grey16()), "TIFF"), ("16-bit->8-bit (>>8)", "tiff->png"), "png"),
    "float.tif": (lambda: _save(Image.fromarray(np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)), "TIFF"),
                  ("float->8-bit (0..1 x255)", "tiff->png"), "png"),
    "int32.tif": (lambda: _save(Image.fromarray(np.linspace(-9e6, 9e6, H * W).reshape(H, W).astype(np.int32)),
                                "TIFF"), ("32-bit->8-bit (min", "tiff->png"), "png"),
    "ycbcr.tif": (lambda: _save(Image.fromarray(_gradient()).convert("YCbCr"), "TIFF"), ("ycbcr->rgb",), "png"),
    "palette.png": (_palette_png, ("palette->rgb", "alpha over black"), "png"),
    "la.png": (lambda: _alpha("LA"), ("grayscale", "alpha over black"), "png"),
    "rgba.png": (lambda: _alpha("RGBA"), ("alpha over black",), "png"),
    "onebit.png": (lambda: _save(Image.fromarray(_gradient()[..., 0] > 127), "PNG"), ("1-bit->8-bit",), "png"),
    "exif3.JPEG": (lambda: _exif_jpeg(3), ("exif-rotated (3)",), "jpeg"),
    "exif6.JPEG": (lambda: _exif_jpeg(6), ("exif-rotated (6)",), "jpeg"),
    "exif8.JPEG": (lambda: _exif_jpeg(8), ("exif-rotated (8)",), "jpeg"),
}
#: name -> (maker, reason fragment) of byte inputs quarantined here (besides test_images_scale's BAD).
BROKEN: dict[str, tuple[Callable[[], bytes], str]] = {
    "truncated.png": (lambda: _half(_save(Image.fromarray(_gradient()), "PNG")), "truncated or corrupt"),
    "truncated16.png": (lambda: _half(_save(Image.fromarray(_grey16()), "PNG")), "truncated or corrupt"),
    "exif6-truncated.JPEG": (lambda: _exif_jpeg(6)[:-400], "truncated or corrupt"),  # header intact
}
#: entries made on the file system (not bytes) -> the reason fragment they are quarantined with.
SPECIAL = {
    "fifo.JPEG": "not a regular file: fifo",
    "socket.JPEG": "not a regular file: socket",
    "loop": "symlink loop",
    "hardlink.JPEG": "duplicate: same file as train/c0/c0_0.JPEG",
    "symlink.JPEG": "duplicate: same file as train/c0/c0_1.JPEG",
    "broken.JPEG": "broken symbolic link",
    "leak.JPEG": "duplicate: same file as train/c0/c0_2.JPEG",  # val/: a train image under a second name
    "notes.txt": "no image extension",
}


def _make_corpus(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for k, c in enumerate(CLASSES):
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            pixels = np.roll(_gradient(), 7 * i + 20 * k, axis=1)  # every image distinct
            (root / "train" / c / f"{c}_{i}.JPEG").write_bytes(_save(Image.fromarray(pixels), "JPEG"))
    bad = root / "train" / "c1"
    for name, (make, _) in {**BAD, **CONVERTED}.items():
        (bad / name).write_bytes(make(rng))
    for name, (make, _, _) in WRITTEN.items():
        (bad / name).write_bytes(make())
    for name, (make, _) in BROKEN.items():
        (bad / name).write_bytes(make())
    os.mkfifo(bad / "fifo.JPEG")  # opened for reading, it would block prep for ever (no writer)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(bad / "socket.JPEG"))
    sock.close()
    (bad / "loop").symlink_to(".")  # os.walk(followlinks=True) listed every file ~40 times
    os.link(root / "train/c0/c0_0.JPEG", bad / "hardlink.JPEG")
    (bad / "symlink.JPEG").symlink_to("../c0/c0_1.JPEG")
    (bad / "broken.JPEG").symlink_to("nowhere.JPEG")
    (bad / "notes.txt").write_text("not an image")
    (root / "val" / "c0").mkdir(parents=True)
    (root / "val" / "c0" / "val0.JPEG").write_bytes(_save(Image.fromarray(np.roll(_gradient(), 3, axis=0)), "JPEG"))
    os.link(root / "train/c0/c0_2.JPEG", root / "val" / "c0" / "leak.JPEG")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The corpus and its prep output, written through the CLI in a subprocess (a hang fails, not blocks)."""
    src = _make_corpus(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("out")
    cmd = [sys.executable, "-m", "vitpipe", "prep", "imagenet", "--src", str(src), "--out", str(out),
           "--shard-size", "8", "--workers", "1", "--threads", "4", "--max-failure-rate", "0.9"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return src, out


def _rows(out: Path, name: str) -> dict[str, dict]:
    return {Path(r["source"]).name: r for r in pq.read_table(out / name).to_pylist()}


def _payload(out: Path, row: dict) -> bytes:
    with open(out / row["key"].rsplit("_", 1)[0] / row["shard"], "rb") as f:
        f.seek(row["offset"])
        return f.read(row["bytes"])


def test_every_input_written_or_quarantined_with_its_reason(corpus: tuple[Path, Path]) -> None:
    src, out = corpus
    written, quarantined = _rows(out, "train.parquet"), _rows(out, "quarantine.parquet")
    for name, (_, notes, fmt) in WRITTEN.items():
        assert name in written, (name, quarantined.get(name))
        assert all(n in written[name]["note"] for n in notes), (name, written[name]["note"])
        assert written[name]["format"] == fmt, name
    for name, (_, note) in CONVERTED.items():
        assert note in written[name]["note"], (name, written[name]["note"])
    for name, (_, reason) in BAD.items():
        assert reason in quarantined[name]["reason"].lower(), (name, quarantined[name]["reason"])
    for name, (_, reason) in BROKEN.items():
        assert reason in quarantined[name]["reason"], (name, quarantined[name]["reason"])
    for name, reason in SPECIAL.items():
        assert reason in quarantined[name]["reason"], (name, quarantined[name]["reason"])
    assert set(quarantined) == set(BAD) | set(BROKEN) | set(SPECIAL)
    # Each real file once: the symlink loop and the second names did not multiply images.
    assert len(pq.read_table(out / "train.parquet")) == len(written) == 2 * 3 + len(CONVERTED) + len(WRITTEN)
    from data_prep.format import load_dataset_info

    c = load_dataset_info(out).counts
    entries = sum(1 for _ in (src / "train" / "c1").iterdir()) + 3 + 2  # + c0's three images, val's two
    assert c.inputs == c.written + c.quarantined == entries
    assert (c.written, c.quarantined) == (len(written) + 1, len(quarantined))
    assert [r["source"] for r in pq.read_table(out / "val.parquet").to_pylist()] == ["val/c0/val0.JPEG"]


def test_high_bit_depth_scaled_not_clipped(corpus: tuple[Path, Path]) -> None:
    _, out = corpus
    rows = _rows(out, "train.parquet")
    expected_pixels = {"grey16.png": _grey16() >> 8, "grey16.tif": _grey16() >> 8, "rgb16.png": _rgb16() >> 8}
    for name, expected in expected_pixels.items():
        stored = np.asarray(Image.open(io.BytesIO(_payload(out, rows[name]))))
        assert stored.dtype == np.uint8 and np.array_equal(stored, expected), name
    assert np.asarray(Image.open(io.BytesIO(_payload(out, rows["grey16.png"])))).min() == 1000 >> 8


def test_exif_orientation_applied_and_not_left_in_the_file(corpus: tuple[Path, Path]) -> None:
    _, out = corpus
    rows = _rows(out, "train.parquet")
    for o in (3, 6, 8):
        row = rows[f"exif{o}.JPEG"]
        stored = Image.open(io.BytesIO(_payload(out, row)))
        assert stored.getexif().get(0x0112) is None
        upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(_exif_jpeg(o)))), dtype=float)
        assert (row["width"], row["height"]) == (upright.shape[1], upright.shape[0]) == stored.size
        assert np.abs(np.asarray(stored, dtype=float) - upright).mean() < 3, o


def _dali_cpu_decode(blobs: list[bytes]) -> list[np.ndarray]:
    """DALI's CPU image decoder, as the ``dali`` backend calls it (``fn.decoders.image``, RGB)."""
    from nvidia.dali import fn, pipeline_def, types

    arrays = [np.frombuffer(b, np.uint8) for b in blobs]

    @pipeline_def(batch_size=len(arrays), num_threads=1, device_id=None)
    def pipe():  # noqa: ANN202 - DALI graph
        data = fn.external_source(source=lambda: arrays, batch=True, dtype=types.UINT8)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    (images,) = p.run()
    return [np.asarray(images[i]) for i in range(len(arrays))]


def test_both_backends_decode_every_written_sample_alike(corpus: tuple[Path, Path]) -> None:
    pytest.importorskip("nvidia.dali")
    from pipeline.data.wds import image_sample_fn

    _, out = corpus
    rows = [*_rows(out, "train.parquet").values(), *_rows(out, "val.parquet").values()]
    wds_decode = image_sample_fn(np.asarray)
    blobs = [_payload(out, r) for r in rows]
    dali = _dali_cpu_decode(blobs)
    for row, blob, from_dali in zip(rows, blobs, dali, strict=True):
        from_wds = wds_decode({"__key__": row["key"], row["format"].replace("jpeg", "jpg"): blob})
        assert from_wds.shape == from_dali.shape == (row["height"], row["width"], 3), row["source"]
        if row["format"] == "png":  # lossless: the same values
            assert np.array_equal(from_wds, from_dali), row["source"]


def test_file_turned_fifo_after_planning_is_quarantined_unopened(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(3):
        (src / "train" / "a" / f"{i}.JPEG").parent.mkdir(parents=True, exist_ok=True)
        (src / "train" / "a" / f"{i}.JPEG").write_bytes(_save(Image.fromarray(_gradient()), "JPEG"))
    plan = build_image_plan(src, shard_size=4, splits=("train",))
    victim = src / "train" / "a" / "1.JPEG"
    victim.unlink()
    os.mkfifo(victim)
    run_plan(plan, tmp_path / "out", ImageOptions(), threads=2, settings={"max_failure_rate": 0.5})
    merge(tmp_path / "out")
    q = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    assert [(r["source"], r["reason"]) for r in q] == [("train/a/1.JPEG", "not a regular file: fifo")]
    with pytest.raises(SourceError, match="not a regular file: fifo"):
        read_source(victim)


def test_video_tree_walked_safely(tmp_path: Path) -> None:
    """A FIFO named like an annotated clip is quarantined unopened; a symlink loop lists nothing twice."""
    import json

    from data_prep.video_sources import scan_diving48

    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    (videos / "a.mp4").write_bytes(b"planning does not decode")
    (videos / "sub" / "loop").symlink_to("..")
    os.mkfifo(videos / "b.mp4")
    entries = [{"vid_name": n, "label": 0} for n in ("a", "b", "gone")]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    plan = scan_diving48({"train": tmp_path / "train.json"}, videos, shard_size=4, seed=0, options={})
    assert [s.source for s in plan.splits["train"]] == ["a.mp4"]
    assert plan.prequarantined["train"] == [("b", "not a regular file: fifo"), ("gone", "video file not found")]


_BLOCKING_READS = """
import os, sys, time
import data_prep.loading as loading
from data_prep.errors import PrepError
r, w = os.pipe()  # the write end stays open and silent: os.read(r) blocks, like a read on a hung NFS mount
def read(i):
    return os.read(r, 1) if i % 2 else b"ok"
start = time.monotonic()
out = list(loading.ordered_map(read, range(6), 3, timeout_s=0.3, on_timeout=loading.read_timeout_reason))
print(out, round(time.monotonic() - start, 1), loading._stuck)
loading.MAX_STUCK = 4
try:
    list(loading.ordered_map(read, range(6), 2, timeout_s=0.2, on_timeout=loading.read_timeout_reason))
except PrepError as exc:
    print(exc)
"""


def test_blocked_reads_time_out_and_the_process_still_exits() -> None:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _BLOCKING_READS], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    results, seconds, stuck = first.rsplit(" ", 2)
    timeout = "read timeout: not read and checked after 0.3 s (--read-timeout-s)"
    assert results == str([b"ok", timeout] * 3) and int(stuck) == 3
    assert float(seconds) < 5 and time.monotonic() - start < 30  # nothing waited for the stuck reads' threads
    assert second.startswith("5 reads of the source blocked for more than 0.2 s")  # bounded: one line, no spin


# ---------------------------------------------------------------- CLI (issue 15, finding 8)


SOURCES = ("imagenet", "kinetics", "ssv2", "diving48", "videolist")


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from vitpipe.prep import main

    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().out


@pytest.mark.parametrize("source", [*SOURCES, "merge", "verify", "inspect"])
def test_every_prep_help_shows_its_own_example(source: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["prep", source, "--help"], capsys)
    example = text.split("example:", 1)[1]
    assert f"vitpipe prep {source} " in example
    assert not [s for s in SOURCES if s != source and f"vitpipe prep {s} " in example]


def test_missing_source_folders_and_files_are_one_line_exit_2(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from vitpipe.prep import main

    csv = tmp_path / "train.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split\n")
    missing, out = str(tmp_path / "missing"), str(tmp_path / "out")
    cases = {
        ("imagenet", "--src", missing): f"no such directory: {missing} (--src)",
        ("kinetics", "--annotations", str(csv), "--videos", missing): f"no such directory: {missing} (--videos)",
        ("kinetics", "--annotations", missing, "--videos", str(tmp_path)): f"no such file: {missing} (--annotations)",
        ("ssv2", "--labels", str(csv), "--train", str(csv), "--videos", missing): "no such directory",
        ("diving48", "--train", str(csv), "--videos", missing): "no such directory",
        ("videolist", "--list", f"train={missing}", "--root", str(tmp_path)): f"no such file: {missing} (--list)",
        ("videolist", "--list", f"train={csv}", "--root", missing): f"no such directory: {missing} (--root)",
    }
    for argv, message in cases.items():
        assert main(["prep", *argv, "--out", out]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    proc = subprocess.run([sys.executable, "-m", "vitpipe", "prep", "kinetics", "--annotations", str(csv),
                           "--videos", missing, "--out", out], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(f"no such directory: {missing} "
                                                                                  "(--videos)"), proc.stderr
    assert "Traceback" not in proc.stderr
