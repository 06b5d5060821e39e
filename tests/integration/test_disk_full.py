"""A full disk, for real: prep and training write to a small tmpfs that runs out of space.

Each run must stop with one line naming the path and the error, leave no temporary file, and a rerun
after freeing space (deleting a filler file) must complete; prep's rerun gives the same bytes as an
uninterrupted run. Skipped where a tmpfs cannot be mounted (not root, or no mount namespace).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

RECIPE = "jobs/demo/vitnano_digits_cls_cpu_quick.toml"
MB = 1 << 20


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs mounted under ``tmp_path``, unmounted in teardown."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> Path:
    """Write a filler file so that about ``leave`` bytes stay free on ``mnt``."""
    filler = mnt / "filler"
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error_line(stderr: str, path_part: str, phrases: tuple[str, ...] = ("no space left on device",)) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert any(p in lines[0].lower() for p in phrases) and path_part in lines[0], lines[0]
    assert "MB free" in lines[0], lines[0]
    return lines[0]


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name == ".space_reserve"]


def test_prep_on_full_disk_one_line_no_temporaries_rerun_identical(tmpfs: Path, tmp_path: Path) -> None:
    from data_prep.digits import write_digits

    raw = tmp_path / "raw"
    write_digits(raw, size=32, limit=400)
    prep = ["prep", "imagenet", "--src", str(raw), "--shard-size", "16", "--workers", "2", "--out"]
    ref = tmp_path / "ref"
    done = run_cli(*prep, str(ref), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    total = sum(len(b) for b in _files(ref).values())
    out = tmpfs / "shards"
    filler = _fill(tmpfs, total // 2)  # fails about half-way through the shards

    full = run_cli(*prep, str(out), timeout=300)
    assert full.returncode == 2, full.stderr[-3000:]
    line = _one_error_line(full.stderr, str(out))
    print(line)
    assert not _temporaries(out), _temporaries(out)
    assert not (out / "dataset.json").exists()
    written = list(out.rglob("*.tar"))
    assert written, f"the disk filled before any shard was written: {line}"

    filler.unlink()
    again = run_cli(*prep, str(out), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete" in again.stderr  # resumed per shard, not from scratch
    assert _files(out) == _files(ref)


def test_training_on_full_disk_one_line_summary_rerun_completes(digits_shards: Path, tmpfs: Path) -> None:
    args = ["train", RECIPE, f"--data.path={digits_shards}", f"--run.output_dir={tmpfs}", "--run.name=full",
            "--tracking.enabled=false", "--schedule.epochs=1", "--eval.every_epochs=0", "--data.num_workers=1",
            "--checkpoint.every_steps=1", "--checkpoint.keep_last=2", "--tracking.log_every_steps=1"]
    probe = run_cli(*args[:4], "--run.name=probe", *args[5:], timeout=300)  # one run's full size, on tmpfs
    assert probe.returncode == 0, probe.stderr[-3000:]
    ckpt = max(sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
               for d in (tmpfs / "probe" / "checkpoints").glob("step_*"))
    subprocess.run(["rm", "-rf", str(tmpfs / "probe")], check=True)
    filler = _fill(tmpfs, int(1.6 * ckpt) + (512 << 10))  # step 1's checkpoint fits, step 2's does not

    full = run_cli(*args, timeout=300)
    assert full.returncode == 2, full.stderr[-3000:]
    # torch reports a short checkpoint write without errno ("unexpected pos"): the run directory is named
    print(_one_error_line(full.stderr, str(tmpfs / "full"), ("no space left on device", "writing a checkpoint failed")))
    run_dir = tmpfs / "full"
    assert not _temporaries(run_dir), _temporaries(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary, summary

    filler.unlink()
    again = run_cli(*args, timeout=300)  # checkpoint.resume: continues the run
    assert again.returncode == 0, again.stderr[-3000:]
    log = (run_dir / "log.rank0.txt").read_text() if (run_dir / "log.rank0.txt").is_file() else again.stderr
    assert "resumed from" in log and "step_00000001" in log, log[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "FINISHED"
    assert not list(run_dir.rglob("*.tmp")), list(run_dir.rglob("*.tmp"))
