"""Tests of the offline sharder (data_prep): scan, tar + DALI index, manifest, dataset.json, CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.errors import PrepError
from data_prep.format import Counts, DatasetInfo, FormatError, load_dataset_info
from data_prep.loading import ordered_map
from data_prep.manifest import MANIFEST_SCHEMA, ManifestRow
from data_prep.scan import scan_imagefolder
from data_prep.shard import prep_imagefolder, write_split
from vitpipe.prep import add_prep_parser

CLASSES = ["n01", "n02", "n03"]
SHARD_SIZE = 5
CORRUPT = "train/n02/corrupt.JPEG"
PNG = "train/n03/n03_png.png"


def _save_image(path: Path, rng: np.random.Generator, fmt: str = "JPEG") -> None:
    """Write a small random-noise image of varied size."""
    h, w = (int(x) for x in rng.integers(12, 24, size=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)


def _make_imagefolder(root: Path, classes: list[str], n_train: int, n_val: int, seed: int = 0) -> Path:
    """Create root/{train,val}/<class>/*.JPEG with random-noise JPEGs."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            for i in range(n):
                ext = ".jpg" if i == 1 else ".JPEG"  # mixed extension case
                _save_image(root / split / c / f"{c}_{i:03d}{ext}", rng)
    return root


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = _make_imagefolder(tmp_path_factory.mktemp("src"), CLASSES, n_train=7, n_val=2)
    _save_image(root / PNG, np.random.default_rng(1), fmt="PNG")
    (root / CORRUPT).write_bytes(np.random.default_rng(2).integers(0, 256, 600, dtype=np.uint8).tobytes())
    (root / "train/n01/notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def prepped(src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DatasetInfo]:
    out = tmp_path_factory.mktemp("out")
    return out, prep_imagefolder(src, out, shard_size=SHARD_SIZE, seed=0, max_failure_rate=0.2)


def _expected(src: Path, split: str) -> dict[str, tuple[bytes, int]]:
    """Source path (relative) -> (bytes, label) for every valid image of a split."""
    found = {}
    for path in sorted((src / split).rglob("*")):
        rel = path.relative_to(src).as_posix()
        if path.is_file() and path.suffix.lower() in {".jpg", ".jpeg", ".png"} and rel != CORRUPT:
            found[rel] = (path.read_bytes(), CLASSES.index(path.parent.name))
    return found


def _shard_paths(out: Path, info: DatasetInfo, split: str, key: str = "name") -> list[str]:
    return [str(out / split / getattr(s, key)) for s in info.split(split).shards]


def _find_wds2idx() -> str | None:
    found = shutil.which("wds2idx")
    candidate = Path(sys.executable).parent / "wds2idx"
    return found or (str(candidate) if candidate.exists() else None)


# ---------------------------------------------------------------- scan


def test_scan_sorted_classes_and_extensions(src: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="data_prep"):
        classes, samples = scan_imagefolder(src / "train")
    assert classes == CLASSES
    assert len(samples) == 3 * 7 + 2  # PNG and the corrupt .JPEG are candidates; notes.txt is not
    sources = [s.source for s in samples]
    assert sources == sorted(sources, key=lambda p: (p.split("/")[1], p))
    assert all(CLASSES[s.label] == s.class_id and s.source.startswith("train/") for s in samples)
    assert any(s.source.endswith(".jpg") for s in samples)
    assert "skipped 1 file(s)" in caplog.text


def test_scan_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(PrepError, match="no such directory"):
        scan_imagefolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepError, match="no class folders"):
        scan_imagefolder(tmp_path / "empty")
    (tmp_path / "noimg" / "c1").mkdir(parents=True)
    (tmp_path / "noimg" / "c1" / "a.txt").write_text("x")
    with pytest.raises(PrepError, match="no image files"):
        scan_imagefolder(tmp_path / "noimg")


# ---------------------------------------------------------------- round trip


def test_roundtrip_webdataset(src: Path, prepped: tuple[Path, DatasetInfo]) -> None:
    import webdataset as wds

    out, info = prepped
    for split in ("train", "val"):
        expected = _expected(src, split)
        seen: Counter[str] = Counter()
        keys = []
        for sample in wds.WebDataset(_shard_paths(out, info, split), shardshuffle=False):
            meta = json.loads(sample["json"])
            data = sample.get("jpg", sample.get("png"))
            payload, label = expected[meta["source"]]
            assert data == payload
            assert meta == {"label": label, "class_id": CLASSES[label], "source": meta["source"]}
            assert int(sample["cls"].decode("ascii")) == label
            assert np.frombuffer(sample["lbl"], dtype="<i8").tolist() == [label]
            seen[meta["source"]] += 1
            keys.append(sample["__key__"])
        assert seen == Counter(expected.keys())  # every file exactly once
        assert keys == sorted(set(keys))  # unique, in planned order; a quarantined input leaves a gap
        assert set(keys) <= {f"{split}_{i:08d}" for i in range(len(expected) + 1)}
        assert info.splits[split].num_samples == len(expected)


def test_manifest_points_at_payload(src: Path, prepped: tuple[Path, DatasetInfo]) -> None:
    out, info = prepped
    for split in ("train", "val"):
        table = pq.read_table(out / info.splits[split].manifest)
        assert table.schema.equals(MANIFEST_SCHEMA, check_metadata=True)
        rows = table.to_pylist()
        assert len(rows) == info.splits[split].num_samples
        per_shard = Counter(r["shard"] for r in rows)
        assert per_shard == {s.name: s.num_samples for s in info.splits[split].shards}
        blobs = {name: (out / split / name).read_bytes() for name in per_shard}
        for r in rows:
            ManifestRow(**r)  # column set matches the dataclass
            payload = (src / r["source"]).read_bytes()
            assert blobs[r["shard"]][r["offset"] : r["offset"] + r["bytes"]] == payload
            assert r["sha256"] == hashlib.sha256(payload).hexdigest()
            with Image.open(src / r["source"]) as img:
                assert (r["width"], r["height"]) == img.size
                assert r["format"] == img.format.lower()
            assert r["class_id"] == CLASSES[r["label"]]


def test_tar_headers_fixed(prepped: tuple[Path, DatasetInfo]) -> None:
    out, info = prepped
    with tarfile.open(_shard_paths(out, info, "train")[0]) as tar:
        members = tar.getmembers()
    exts = [m.name.split(".", 1)[1] for m in members[:4]]
    assert exts in (["jpg", "cls", "lbl", "json"], ["png", "cls", "lbl", "json"])
    for m in members:
        fields = (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type)
        assert fields == (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
    assert not list((out / "train").glob(".*")), "temporary files left behind"


def test_png_kept_as_png(prepped: tuple[Path, DatasetInfo]) -> None:
    out, info = prepped
    rows = [r for r in pq.read_table(out / "train.parquet").to_pylist() if r["source"] == PNG]
    assert len(rows) == 1 and rows[0]["format"] == "png"
    with tarfile.open(out / "train" / rows[0]["shard"]) as tar:
        assert f"{rows[0]['key']}.png" in tar.getnames()


def test_corrupt_image_quarantined_and_recorded(prepped: tuple[Path, DatasetInfo]) -> None:
    out, info = prepped
    rows = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert [(r["split"], r["source"]) for r in rows] == [("train", CORRUPT), ("train", "train/n01/notes.txt")]
    assert "cannot identify" in rows[0]["reason"] and rows[0]["key"].startswith("train_")
    assert "no image extension" in rows[1]["reason"] and rows[1]["key"] is None
    sources = pq.read_table(out / "train.parquet", columns=["source"]).column("source").to_pylist()
    assert CORRUPT not in sources
    assert info.counts == Counts(inputs=30, written=28, quarantined=2)
    assert info.splits["train"].inputs == 24 and info.splits["train"].quarantined == 2
    assert load_dataset_info(out).quarantine.num_samples == 2


def test_dataset_json(prepped: tuple[Path, DatasetInfo]) -> None:
    out, info = prepped
    assert load_dataset_info(out / "dataset.json") == info == load_dataset_info(out)
    assert info.format_version == 2 and info.kind == "image"
    assert list(info.classes) == CLASSES and info.num_classes == 3
    assert info.options["shard_size"] == SHARD_SIZE and info.options["seed"] == 0
    assert info.options["resize"] is None and info.options["decode_check"] is True
    train = info.splits["train"]
    assert train.manifest == "train.parquet"
    assert sorted(s.num_samples for s in train.shards) == [3, 4, 5, 5, 5]  # 23 planned, 1 quarantined
    first = train.shards[0]
    assert first.name == "train-000000.tar" and first.index == "train-000000.idx"
    assert first.bytes == (out / "train" / first.name).stat().st_size
    for split in ("train", "val"):
        for s in info.splits[split].shards:
            assert (out / split / s.name).is_file() and (out / split / s.index).is_file()
    assert (out / "dataset.json").read_text() == info.dumps()


# ---------------------------------------------------------------- order and determinism


def test_train_shuffled_val_sorted(prepped: tuple[Path, DatasetInfo]) -> None:
    out, _ = prepped
    train = pq.read_table(out / "train.parquet").to_pylist()
    labels = [r["label"] for r in train]
    assert labels != sorted(labels)
    for shard in {r["shard"] for r in train}:
        shard_labels = {r["label"] for r in train if r["shard"] == shard}
        assert len(shard_labels) > 1
    val = pq.read_table(out / "val.parquet").to_pylist()
    assert [(r["label"], r["source"]) for r in val] == sorted((r["label"], r["source"]) for r in val)


def test_byte_identical_rerun(src: Path, prepped: tuple[Path, DatasetInfo], tmp_path: Path) -> None:
    out, _ = prepped
    # the fixture used the default 8 reader threads; single-threaded reading must give the same bytes
    prep_imagefolder(src, tmp_path / "again", shard_size=SHARD_SIZE, seed=0, workers=1, processes=2,
                     max_failure_rate=0.2)
    first, second = (sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
                     for d in (out, tmp_path / "again"))
    assert first == second
    assert any(f.endswith(".idx") for f in first) and any(f.endswith(".parquet") for f in first)
    for rel in first:
        assert (out / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel


def test_seed_and_shuffle_flag(src: Path, tmp_path: Path) -> None:
    classes, samples = scan_imagefolder(src / "val")
    a = write_split(samples, classes, tmp_path / "a", "val", shard_size=100, seed=0, shuffle=True)
    b = write_split(samples, classes, tmp_path / "b", "val", shard_size=100, seed=1, shuffle=True)
    assert a.num_samples == b.num_samples == 6
    order_a = pq.read_table(tmp_path / "a" / "val.parquet").column("source").to_pylist()
    order_b = pq.read_table(tmp_path / "b" / "val.parquet").column("source").to_pylist()
    assert sorted(order_a) == sorted(order_b) and order_a != order_b


def test_rerun_removes_stale_shards(src: Path, tmp_path: Path) -> None:
    prep_imagefolder(src, tmp_path, shard_size=3, seed=0, splits=("train",), max_failure_rate=0.2)
    assert len(list((tmp_path / "train").glob("*.tar"))) == 8
    info = prep_imagefolder(src, tmp_path, shard_size=10, seed=0, splits=("train",), max_failure_rate=0.2)
    names = sorted(p.name for p in (tmp_path / "train").iterdir())
    shards = info.splits["train"].shards
    assert names == sorted(n for s in shards for n in (s.name, s.index, s.name[:-4] + ".parquet"))
    assert "val" not in info.splits


def test_ordered_map_keeps_order_and_bounds_window() -> None:
    import threading
    import time

    in_flight, peak, lock = 0, 0, threading.Lock()

    def slow(i: int) -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.002 * (i % 3))
        with lock:
            in_flight -= 1
        return i * i

    assert list(ordered_map(slow, range(50), workers=4)) == [i * i for i in range(50)]
    assert peak <= 4
    assert list(ordered_map(slow, range(5), workers=1)) == [0, 1, 4, 9, 16]

    def boom(i: int) -> int:
        if i == 7:
            raise RuntimeError("boom")
        return i

    with pytest.raises(RuntimeError, match="boom"):
        list(ordered_map(boom, range(20), workers=3))


# ---------------------------------------------------------------- DALI index


def test_idx_matches_wds2idx(prepped: tuple[Path, DatasetInfo], tmp_path: Path) -> None:
    tool = _find_wds2idx()
    if tool is None:
        pytest.skip("wds2idx (from nvidia-dali) not installed")
    out, info = prepped
    for split in ("train", "val"):
        pairs = zip(_shard_paths(out, info, split), _shard_paths(out, info, split, "index"), strict=True)
        for tar_path, idx_path in pairs:
            ref = tmp_path / (Path(idx_path).name)
            subprocess.run([tool, tar_path, str(ref)], check=True, capture_output=True)
            assert Path(idx_path).read_text() == ref.read_text()
    first = (out / "train" / "train-000000.idx").read_text().splitlines()
    assert first[0] == "v1.2 5"
    assert first[1].split()[0::4] == [first[1].split()[0], "cls", "lbl", "json"]


def test_dali_cpu_reader_labels(tmp_path: Path) -> None:
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    classes = [f"c{i:02d}" for i in range(12)]  # labels 10 and 11 catch the ASCII ".cls" gotcha
    src = _make_imagefolder(tmp_path / "src", classes, n_train=2, n_val=0)
    info = prep_imagefolder(src, tmp_path / "out", shard_size=7, seed=3, splits=("train",))
    out = tmp_path / "out"
    rows = pq.read_table(out / "train.parquet").to_pylist()

    @dali.pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():  # type: ignore[no-untyped-def]
        jpg, lbl = fn.readers.webdataset(
            paths=_shard_paths(out, info, "train"), index_paths=_shard_paths(out, info, "train", "index"),
            ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
            name="reader",
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), lbl

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == len(rows) == 24
    labels, shapes = [], []
    while len(labels) < len(rows):
        images, lbls = p.run()
        for i in range(len(lbls)):
            labels.append(int(np.asarray(lbls[i]).reshape(-1)[0]))
            shapes.append(np.asarray(images[i]).shape)
    assert labels[: len(rows)] == [r["label"] for r in rows]
    assert shapes[: len(rows)] == [(r["height"], r["width"], 3) for r in rows]
    assert max(labels) == 11


# ---------------------------------------------------------------- errors


def test_missing_src(tmp_path: Path) -> None:
    with pytest.raises(PrepError, match="no such directory"):
        prep_imagefolder(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_val_class_not_in_train(tmp_path: Path) -> None:
    src = _make_imagefolder(tmp_path / "src", ["a", "b"], n_train=1, n_val=1)
    _save_image(src / "val" / "zz" / "x.JPEG", np.random.default_rng(0))
    with pytest.raises(PrepError, match="not in the train classes.*'zz'"):
        prep_imagefolder(src, tmp_path / "out")
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_all_corrupt_split_fails(tmp_path: Path) -> None:
    (tmp_path / "src" / "train" / "a").mkdir(parents=True)
    (tmp_path / "src" / "train" / "a" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(PrepError, match="1 of 1 inputs quarantined"):
        prep_imagefolder(tmp_path / "src", tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.tar")) and not (tmp_path / "out" / "dataset.json").exists()


def test_load_dataset_info_missing(tmp_path: Path) -> None:
    msg = r"is not a vitpipe dataset: no dataset.json; run `vitpipe prep imagenet` first"
    with pytest.raises(FormatError, match=msg):
        load_dataset_info(tmp_path)


def test_invalid_shard_size(src: Path, tmp_path: Path) -> None:
    with pytest.raises(PrepError, match="shard size"):
        prep_imagefolder(src, tmp_path, shard_size=0)


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitpipe")
    add_prep_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_runs(src: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    args = _parser().parse_args(
        ["prep", "imagenet", "--src", str(src), "--out", str(tmp_path / "o"),
         "--shard-size", "50", "--seed", "2", "--workers", "1", "--threads", "2", "--max-failure-rate", "0.2"]
    )
    with caplog.at_level(logging.INFO, logger="data_prep"), caplog.at_level(logging.INFO, logger="vitpipe.prep"):
        assert args.func(args) == 0
    options = load_dataset_info(tmp_path / "o").options
    assert options["shard_size"] == 50 and options["seed"] == 2
    assert "prepared 3 classes" in caplog.text and "train: 22 samples in 1 shards" in caplog.text

    bad = _parser().parse_args(
        ["prep", "imagenet", "--src", str(tmp_path / "x"), "--out", str(tmp_path / "y")]
    )
    with pytest.raises(PrepError, match="no such directory"):
        bad.func(bad)


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["prep", "imagenet", "--help"])
    text = capsys.readouterr().out
    needles = ("train/<class-id>/*.JPEG", "val/<class-id>/*.JPEG", "--shard-size", "example:", "dataset.json")
    for needle in needles:
        assert needle in text
    with pytest.raises(SystemExit):
        _parser().parse_args(["prep", "imagenet", "--src", "a", "--out", "b", "--shard-size", "0"])


def test_slurm_task_command_parses_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--slurm`` rebuilds each array task's command: same options, paths absolute, Slurm-only ones dropped."""
    from vitpipe.prep import _task_argv

    monkeypatch.chdir(tmp_path)
    slurm_only = ["--slurm", "--slurm-tasks", "3", "--partition", "p", "--dry-run", "--workers", "5",
                  "--task-index", "1", "--num-tasks", "2"]
    cases = [
        ["videolist", "--list", "train=a b.txt", "--list", "val=v.txt", "--root", "r", "--codec", "vp9", "--fps", "15",
         "--out", "o", "--classes", "c.txt"],
        ["imagenet", "--src", "s", "--out", "o", "--splits", "train", "val", "extra", "--header-only", "--resize", "64",
         "--nodes", "2"],
        ["kinetics", "--annotations", "t.csv", "v.csv", "--videos", "v", "--out", "o", "--full-videos"],
    ]
    for argv in cases:
        args = _parser().parse_args(["prep", *argv, *slurm_only])
        task = _task_argv(args)
        assert not set(task) & {"--slurm", "--slurm-tasks", "--partition", "--dry-run", "--workers", "--task-index"}
        back = _parser().parse_args(["prep", *task])
        plain = _parser().parse_args(["prep", *argv])
        for key, value in vars(plain).items():
            if key in ("func", "task_options"):
                continue
            if isinstance(value, Path):
                value = value.resolve()
            elif isinstance(value, list):
                value = [(v[0], v[1].resolve()) if isinstance(v, tuple) else v.resolve() if isinstance(v, Path)
                         else v for v in value]
            assert getattr(back, key) == value, key
    videolist = _parser().parse_args(["prep", *cases[0], *slurm_only])
    assert _task_argv(videolist)[:5] == ["videolist", "--out", str(tmp_path / "o"), "--shard-size", "100"]


def test_python_m_entry_point(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vitpipe", "prep", "imagenet", "--help"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert "--src DIR" in result.stdout

