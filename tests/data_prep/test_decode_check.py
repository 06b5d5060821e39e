"""The reduced-scale decode check catches what the full decode catches; tar headers built once, same bytes."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.imagenet import build_image_plan
from data_prep.images import ImageOptions, Quarantine, check_decodes, process_image
from data_prep.shard import merge, run_plan
from data_prep.tarwrite import TarShardWriter, member_header


def _photo(w: int = 320, h: int = 240, seed: int = 0, progressive: bool = False, mode: str = "RGB") -> bytes:
    """A photo-like JPEG (smooth content plus noise, quality 90)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    arr = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    arr = np.clip(arr + rng.normal(0, 10, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def _scan(data: bytes) -> tuple[int, int]:
    """Start and end of the (last) entropy-coded segment: after the SOS header, before EOI."""
    sos = data.rindex(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big"), len(data) - 2


def _truncated_mid_scan(data: bytes) -> bytes:
    start, end = _scan(data)
    return data[: (start + end) // 2]


def _flipped_entropy_bytes(data: bytes) -> bytes:
    """Every 37th byte of the middle half of the scan XOR 0x55 (bit rot in the Huffman-coded data)."""
    start, end = _scan(data)
    out = bytearray(data)
    for i in range(start + (end - start) // 4, end - (end - start) // 4, 37):
        out[i] ^= 0x55
    return bytes(out)


def _bad_marker_mid_scan(data: bytes) -> bytes:
    """Two bytes in the middle of the scan replaced by ``FF 02``, a marker that cannot occur there."""
    start, end = _scan(data)
    mid = (start + end) // 2
    return data[:mid] + b"\xff\x02" + data[mid + 2 :]


BROKEN = {
    "truncated mid-scan": (_truncated_mid_scan, False),
    "truncated mid-scan, progressive": (_truncated_mid_scan, True),
    "corrupt entropy data": (_flipped_entropy_bytes, False),
    "corrupt entropy data, progressive": (_flipped_entropy_bytes, True),
    "invalid marker in the scan": (_bad_marker_mid_scan, False),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_reduced_scale_check_catches_what_full_decode_catches(case: str) -> None:
    make, progressive = BROKEN[case]
    good = _photo(progressive=progressive)
    bad = make(good)
    with pytest.raises(OSError):  # the full decode (the check before) rejects it ...
        Image.open(io.BytesIO(bad)).load()
    with pytest.raises(OSError):  # ... and so does the reduced-scale one
        check_decodes(Image.open(io.BytesIO(bad)))
    with pytest.raises(Quarantine, match="truncated or corrupt image data"):
        process_image(bad, "x.JPEG", ImageOptions())
    assert process_image(bad, "x.JPEG", ImageOptions(decode_check=False)).components == [("jpg", bad)]
    assert process_image(good, "x.JPEG", ImageOptions()).components == [("jpg", good)]


def test_check_decodes_at_one_eighth_scale_luma_only() -> None:
    img = Image.open(io.BytesIO(_photo(500, 375)))
    check_decodes(img)
    assert (img.size, img.mode) == ((63, 47), "L")  # ceil(500 / 8) x ceil(375 / 8), Y channel only
    gray = Image.open(io.BytesIO(_photo(64, 48, mode="L")))
    check_decodes(gray)
    assert (gray.size, gray.mode) == ((8, 6), "L")
    png = io.BytesIO()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(png, format="PNG")
    img = Image.open(png)
    check_decodes(img)
    assert img.size == (30, 20)  # PNG has no scaled decode: decoded in full


def test_broken_jpegs_quarantined_by_a_prep_run(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "train" / "a").mkdir(parents=True)
    for i in range(4):
        (src / "train" / "a" / f"ok{i}.JPEG").write_bytes(_photo(seed=i, progressive=i % 2 == 1))
    for i, case in enumerate(sorted(BROKEN)):
        make, progressive = BROKEN[case]
        (src / "train" / "a" / f"bad{i}.JPEG").write_bytes(make(_photo(seed=10 + i, progressive=progressive)))
    plan = build_image_plan(src, splits=("train",), shard_size=4)
    run_plan(plan, tmp_path / "out", ImageOptions(), settings={"max_failure_rate": 1.0})
    info = merge(tmp_path / "out")
    q = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    assert sorted(Path(r["source"]).name for r in q) == [f"bad{i}.JPEG" for i in range(len(BROKEN))]
    assert all(r["reason"].startswith("truncated or corrupt image data") for r in q)
    assert info.counts.written == 4


# ---------------------------------------------------------------- tar headers


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def test_member_header_is_what_tarfile_writes() -> None:
    names = ["a.jpg", "train_00000001.json", "k" * 95 + ".lbl", "é" * 40 + ".jpg", "train_00000042.f0007.jpg"]
    for name in names:
        for size in (0, 1, 511, 512, 513, 77_123, 8**11 - 1):
            assert member_header(name.encode(), size) == _tarfile_header(name, size), (name, size)
    with pytest.raises(ValueError, match="does not fit"):
        member_header(b"a.jpg", 8**11)


def test_shard_bytes_equal_a_tarfile_archive(tmp_path: Path) -> None:
    rng = random.Random(0)
    samples = [(f"s_{i:08d}", [("jpg", rng.randbytes(rng.randint(0, 3000))), ("cls", b"3"), ("json", b"{}")])
               for i in range(40)]
    ref = io.BytesIO()
    with tarfile.TarFile(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, components in samples:
            for ext, data in components:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data), 0, 0o644, 0, 0, "", "")
                tar.addfile(info, io.BytesIO(data))
    with TarShardWriter(tmp_path / "s.tar", tmp_path / "s.idx") as w:
        locs = [w.add_sample(key, components) for key, components in samples]
    blob = (tmp_path / "s.tar").read_bytes()
    assert blob == ref.getvalue()
    for (_, components), where in zip(samples, locs, strict=True):
        assert [blob[loc.offset : loc.offset + loc.size] for loc in where] == [data for _, data in components]
