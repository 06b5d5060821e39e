"""Image prep at scale: bad inputs, ImageNet val layouts, array tasks + merge, resume, verify, inspect."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.errors import PrepError
from data_prep.format import load_dataset_info
from data_prep.imagenet import build_image_plan
from data_prep.images import ImageOptions
from data_prep.plan import task_range
from data_prep.shard import merge, run_plan, write_shard
from data_prep.verify import inspect_dataset, verify_dataset

ROOT = Path(__file__).resolve().parents[2]
WNIDS = ["n01440764", "n01443537", "n01484850"]


def _jpeg(rng: np.random.Generator, w: int = 64, h: int = 48, mode: str = "RGB", quality: int = 90) -> bytes:
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb(rng: np.random.Generator) -> bytes:
    """A small JPEG whose header claims 60000 x 60000 pixels."""
    data = bytearray(_jpeg(rng))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    return bytes(data)


BAD = {  # file name -> (maker, expected outcome: reason fragment or note fragment)
    "truncated.JPEG": (lambda r: _jpeg(r)[:700], "truncated or corrupt"),
    "zero.JPEG": (lambda r: b"", "empty file"),
    "text.JPEG": (lambda r: b"this is not an image\n" * 20, "cannot identify"),
    "bomb.JPEG": (_bomb, "decompression bomb"),
}
CONVERTED = {
    "cmyk.JPEG": (lambda r: _jpeg(r, mode="CMYK"), "cmyk->rgb"),
    "gray.JPEG": (lambda r: _jpeg(r, mode="L"), "grayscale"),
    "pngnamed.JPEG": (_png, "png named .jpeg"),
}


def make_imagenet(root: Path, n_train: int = 6, n_val: int = 2, flat_val: bool = False, bad: bool = True) -> Path:
    """ILSVRC-like tree: train/<wnid>/<wnid>_<i>.JPEG, val/ (class folders or flat ILSVRC2012_val_*)."""
    rng = np.random.default_rng(0)
    for c in WNIDS:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            (root / "train" / c / f"{c}_{i}.JPEG").write_bytes(_jpeg(rng))
    if bad:
        for name, (make, _) in {**BAD, **CONVERTED}.items():
            (root / "train" / WNIDS[1] / name).write_bytes(make(rng))
    (root / "val").mkdir(parents=True, exist_ok=True)
    k = 0
    for c in WNIDS:
        for _ in range(n_val):
            k += 1
            name = f"ILSVRC2012_val_{k:08d}.JPEG"
            path = root / "val" / name if flat_val else root / "val" / c / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_jpeg(rng))
    return root


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagenet(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def single(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One-task reference run through the CLI's code path (2 processes)."""
    out = tmp_path_factory.mktemp("single")
    plan = build_image_plan(src, shard_size=4, seed=1)
    run_plan(plan, out, ImageOptions(), workers=2, threads=2, settings={"max_failure_rate": 0.5})
    merge(out)
    return out


# ---------------------------------------------------------------- bad input


def test_every_bad_input_is_quarantined_or_converted(single: Path) -> None:
    info = load_dataset_info(single)
    q = {Path(r["source"]).name: r for r in pq.read_table(single / "quarantine.parquet").to_pylist()}
    for name, (_, reason) in BAD.items():
        assert reason in q[name]["reason"].lower(), (name, q[name]["reason"])
    assert set(q) == set(BAD)
    rows = {Path(r["source"]).name: r for r in pq.read_table(single / "train.parquet").to_pylist()}
    for name, (_, note) in CONVERTED.items():
        assert note in rows[name]["note"], (name, rows[name]["note"])
    assert rows["pngnamed.JPEG"]["format"] == "png" and rows["cmyk.JPEG"]["format"] == "jpeg"
    c = info.counts
    assert c.inputs == c.written + c.quarantined == 3 * 6 + 7 + 3 * 2
    assert c.quarantined == len(BAD) and info.quarantine.reasons["empty file (0 bytes)"] == 1


def test_cmyk_converted_decodes_as_rgb(single: Path) -> None:
    row = next(r for r in pq.read_table(single / "train.parquet").to_pylist() if r["source"].endswith("cmyk.JPEG"))
    blob = (single / "train" / row["shard"]).read_bytes()[row["offset"] : row["offset"] + row["bytes"]]
    assert Image.open(io.BytesIO(blob)).mode == "RGB"


def test_failure_rate_gate(src: Path, tmp_path: Path) -> None:
    plan = build_image_plan(src, shard_size=4, seed=1)
    run_plan(plan, tmp_path, ImageOptions(), settings={"max_failure_rate": 0.05})
    with pytest.raises(PrepError, match=r"4 of 31 inputs quarantined \(12.90% > --max-failure-rate 5%\)"):
        merge(tmp_path)
    assert not (tmp_path / "dataset.json").exists() and (tmp_path / "quarantine.parquet").is_file()


def test_resize_reencodes(src: Path, tmp_path: Path) -> None:
    opts = ImageOptions(resize=32, quality=85)
    plan = build_image_plan(src, shard_size=100, seed=1, opts=opts, splits=("train",))
    run_plan(plan, tmp_path, opts, settings={"max_failure_rate": 0.5})
    info = merge(tmp_path)
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    assert info.options["resize"] == 32
    assert all(min(r["width"], r["height"]) == 32 for r in rows if r["source"].endswith(f"_{0}.JPEG"))
    resized = [r for r in rows if "resized" in r["note"]]
    assert resized and all(r["format"] == "jpeg" and (r["width"], r["height"]) == (43, 32) for r in resized)


# ---------------------------------------------------------------- ImageNet val layouts, names


def test_val_flat_with_solution_csv_and_synsets(tmp_path: Path) -> None:
    src = make_imagenet(tmp_path / "src", flat_val=True, bad=False)
    lines = ["ImageId,PredictionString"]
    for k in range(1, 7):
        lines.append(f"ILSVRC2012_val_{k:08d},{WNIDS[(k - 1) // 2]} 10 20 30 40")
    (src / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    (src / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n"
                                                "n01484850 great white shark\n")
    plan = build_image_plan(src, shard_size=4)
    assert plan.class_names == ["tench, Tinca tinca", "goldfish", "great white shark"]
    assert [(s.source, s.label) for s in plan.splits["val"]] == [
        (f"val/ILSVRC2012_val_{k:08d}.JPEG", (k - 1) // 2) for k in range(1, 7)]


def test_val_flat_with_devkit(tmp_path: Path) -> None:
    from scipy.io import savemat

    src = make_imagenet(tmp_path / "src", flat_val=True, bad=False)
    data = src / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    ids = {"n01484850": 1, "n01440764": 2, "n01443537": 3}  # ILSVRC ids are not the sorted order
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.array([(ids[w], w, f"name of {w}", 0) for w in WNIDS] + [(1001, "n00000001", "parent", 3)],
                       dtype=dtype)
    savemat(str(data / "meta.mat"), {"synsets": synsets})
    truth = [ids[WNIDS[(k - 1) // 2]] for k in range(1, 7)]
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{t}\n" for t in truth))
    plan = build_image_plan(src, shard_size=4)
    assert [s.label for s in plan.splits["val"]] == [0, 0, 1, 1, 2, 2]
    assert plan.class_names == [f"name of {w}" for w in WNIDS]


def test_val_flat_without_labels_fails(tmp_path: Path) -> None:
    src = make_imagenet(tmp_path / "src", flat_val=True, bad=False)
    with pytest.raises(PrepError, match="flat val folder without labels"):
        build_image_plan(src)


# ---------------------------------------------------------------- scale: tasks + merge, resume


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vitpipe", "prep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_task_ranges_disjoint_and_complete() -> None:
    for n in (1, 7, 1282):
        for k in (1, 2, 3, 16):
            ranges = [task_range(n, i, k) for i in range(k)]
            assert [i for r in ranges for i in r] == list(range(n))
    with pytest.raises(PrepError):
        task_range(10, 2, 2)


def test_two_task_array_plus_merge_equals_single_run(src: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "array"
    common = ["imagenet", "--src", str(src), "--out", str(out), "--shard-size", "4", "--seed", "1",
              "--workers", "1", "--max-failure-rate", "0.5", "--num-tasks", "2"]
    procs = [subprocess.Popen([sys.executable, "-m", "vitpipe", "prep", *common, "--task-index", str(i)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert not (out / "dataset.json").exists()
    assert "task 0/2: shards 0..3 of 9" in logs[0] and "task 1/2: shards 4..8 of 9" in logs[1]
    # the tasks started together: one scanned and planned, the other waited for its plan file
    assert sum("planning" in log for log in logs) == 1 and sum("images in 3 class folders" in log for log in logs) == 1
    assert sorted(p.name for p in (out / "_parts").iterdir()) == ["plan.json", "plan.parquet"]  # lock released
    res = _cli("merge", str(out))
    assert res.returncode == 0, res.stderr
    ref = _files(single)
    # the reference ran with settings={"max_failure_rate": 0.5} only; the CLI adds the train layout
    got = {k: v for k, v in _files(out).items() if k not in ("_parts/plan.json", "dataset.json")}
    assert got == {k: v for k, v in ref.items() if k not in ("_parts/plan.json", "dataset.json")}
    a, b = json.loads((out / "dataset.json").read_text()), json.loads((single / "dataset.json").read_text())
    a.pop("settings"), b.pop("settings"), a.pop("warnings"), b.pop("warnings")
    assert a == b


def test_merge_reports_missing_shards(src: Path, tmp_path: Path) -> None:
    plan = build_image_plan(src, shard_size=4, seed=1)
    run_plan(plan, tmp_path, ImageOptions(), task_index=0, num_tasks=2)
    with pytest.raises(PrepError, match=r"5 planned shard\(s\) missing or incomplete: train-000004.tar, .*val-000001"):
        merge(tmp_path)


def test_interrupted_run_resumes_byte_identical(src: Path, single: Path, tmp_path: Path) -> None:
    plan = build_image_plan(src, shard_size=4, seed=1)
    shards = plan.shards()
    out = tmp_path / "resumed"
    run_plan(plan, out, ImageOptions(), task_index=0, num_tasks=4)  # shards 0-1 finished
    # shard 2 was killed after its tar was renamed but before its sidecar; shard 3 mid-write
    write_shard(shards[2], out, ImageOptions())
    (out / "train" / "train-000002.parquet").unlink()
    (out / "train" / ".train-000003.tar.abc123.tmp").write_bytes(b"partial")
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("train-00000[01].*")}
    time.sleep(0.01)
    results = run_plan(plan, out, ImageOptions(), workers=1, settings={"max_failure_rate": 0.5})
    assert [r.skipped for r in results[:4]] == [True, True, False, False]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("train-00000[01].*")} == kept
    merge(out)
    assert _files(out) == _files(single)


def test_sigkill_and_rerun_gives_identical_shards(tmp_path: Path) -> None:
    src = make_imagenet(tmp_path / "src", n_train=60, n_val=0, bad=False)
    shutil.rmtree(src / "val")
    args = ["imagenet", "--src", str(src), "--out", str(tmp_path / "out"), "--shard-size", "3", "--workers", "1",
            "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "vitpipe", "prep", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((tmp_path / "out").glob("train/*.parquet"))) < 3:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((tmp_path / "out").glob("train/*.parquet")))
    assert not (tmp_path / "out" / "dataset.json").exists() and done < 60
    assert _cli(*args).returncode == 0
    assert _cli(*[a if a != str(tmp_path / "out") else str(tmp_path / "ref") for a in args]).returncode == 0
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


# ---------------------------------------------------------------- readers, verify, inspect


def test_plain_tar_reads_every_shard(single: Path) -> None:
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("no tar binary")
    info = load_dataset_info(single)
    for shard in info.split("train").shards:
        names = subprocess.run([tar, "-tf", str(single / "train" / shard.name)], capture_output=True,
                               text=True, check=True).stdout.split()
        assert len(names) == 4 * shard.num_samples
        with tarfile.open(single / "train" / shard.name) as t:
            assert t.getnames() == names


def test_verify_clean_then_detects_corruption(single: Path, tmp_path: Path) -> None:
    assert verify_dataset(single, decode_fraction=1.0) == []
    bad = tmp_path / "bad"
    shutil.copytree(single, bad)
    shard = bad / "train" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1024] ^= 0xFF  # inside the first payload
    shard.write_bytes(bytes(data))
    (bad / "train" / "train-000002.idx").write_text("v1.2 0\n")
    (bad / "train" / "train-000003.tar").unlink()
    problems = verify_dataset(bad)
    assert any("train-000001.tar" in p and "sha256" in p for p in problems), problems
    assert any("train-000002.tar" in p and "does not match the tar" in p for p in problems)
    assert any("train-000003.tar" in p and "missing" in p for p in problems)
    res = _cli("verify", str(bad))
    assert res.returncode == 1 and "problem(s)" in res.stderr


def test_inspect(single: Path) -> None:
    s = inspect_dataset(single)
    assert s["splits"]["train"]["samples"] == 21 and s["splits"]["train"]["formats"] == {"jpeg": 20, "png": 1}
    assert s["splits"]["val"]["per_class"] == {"min": 2, "median": 2, "max": 2}
    res = _cli("inspect", str(single))
    assert res.returncode == 0 and "[train] 21 samples" in res.stdout


def test_shard_count_warning(src: Path, tmp_path: Path) -> None:
    res = _cli("imagenet", "--src", str(src), "--out", str(tmp_path), "--shard-size", "4", "--workers", "1",
               "--max-failure-rate", "0.5", "--nodes", "2", "--gpus-per-node", "2", "--loader-workers", "2")
    assert res.returncode == 0, res.stderr
    assert "train has 7 shards, fewer than nodes x GPUs x loader workers = 2 x 2 x 2 = 8" in res.stderr
    assert load_dataset_info(tmp_path).warnings
    res = _cli("imagenet", "--src", str(src), "--out", str(tmp_path), "--shard-size", "4", "--workers", "1",
               "--max-failure-rate", "0.5", "--nodes", "1", "--gpus-per-node", "1", "--loader-workers", "2")
    assert "fewer than" not in res.stderr and load_dataset_info(tmp_path).warnings == ()
