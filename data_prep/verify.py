"""``prep verify`` (re-read everything, compare with the manifests) and ``prep inspect`` (summaries)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from data_prep.format import (
    CLS,
    LBL,
    NON_MEDIA,
    ComponentLocation,
    FormatError,
    ShardInfo,
    decode_lbl,
    format_index,
    load_dataset_info,
    read_index,
)

logger = logging.getLogger(__name__)


def _read_tar(path: Path) -> list[tuple[str, list[tuple[ComponentLocation, str]]]]:
    """Return ``(key, components)`` per sample, in tar order, from the tar headers."""
    samples: list[tuple[str, list[tuple[ComponentLocation, str]]]] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, []))
            samples[-1][1].append((ComponentLocation(ext, m.offset_data, m.size), m.name))
    return samples


def check_shard_files(tar_path: Path, idx_path: Path, num_samples: int, tar_bytes: int,
                      offsets: list[int]) -> str | None:
    """Checks a written shard's tar and DALI index against its sidecar record, without reading the tar.

    A stat of the tar and a read of the (small) index: the tar exists with the size the sidecar records;
    the index parses, lists ``num_samples`` samples whose components lie inside the tar, in order, and
    whose media start at the sidecar rows' offsets.

    Args:
        tar_path: The shard.
        idx_path: Its DALI index.
        num_samples: Samples the sidecar records.
        tar_bytes: Tar size the sidecar records.
        offsets: Media offset of each sidecar row, tar order.

    Returns:
        What is wrong, one line naming the file, or None when the shard is consistent.
    """
    try:
        size = tar_path.stat().st_size
    except OSError as exc:
        return f"{tar_path}: shard missing ({exc.strerror})"
    if size != tar_bytes:
        what = "truncated" if size < tar_bytes else "extra data"
        return f"{tar_path}: {size} bytes, its sidecar records {tar_bytes} ({what})"
    if not idx_path.is_file():
        return f"{idx_path}: index missing"
    try:
        index = read_index(idx_path)
    except FormatError as exc:
        return str(exc)
    if len(index) != num_samples:
        return f"{idx_path}: lists {len(index)} samples, the sidecar records {num_samples}"
    last = 0
    for i, sample in enumerate(index):
        spans = sorted(sample.values())
        if not spans or spans[0][0] < last or any(off + n > size for off, n in spans):
            return f"{idx_path}: sample {i}'s components are out of order or outside the tar"
        last = spans[-1][0] + spans[-1][1]
        media = [off for ext, (off, _) in sample.items() if ext not in NON_MEDIA]
        if i < len(offsets) and (not media or min(media) != offsets[i]):
            return f"{idx_path}: sample {i}'s media offset differs from the sidecar manifest"
    return None


def _decode(fmt: str, payload: list[bytes]) -> str | None:
    """Decode one payload; return an error message or None."""
    try:
        if fmt in ("jpeg", "png", "jpeg-frames"):
            from PIL import Image

            for data in payload:
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
        else:
            import av

            with av.open(io.BytesIO(payload[0])) as c:
                if not any(True for _ in c.decode(video=0)):
                    return "no frame decoded"
    except Exception as exc:  # noqa: BLE001 - report any decoder failure
        return f"{type(exc).__name__}: {exc}"
    return None


def verify_dataset(out: Path, decode_fraction: float = 0.01, seed: int = 0) -> list[str]:
    """Re-read every shard and check it against ``dataset.json``, the index files and the manifests.

    Checks: each listed shard and index exists; the tar's sample count equals ``dataset.json``; the
    ``.idx`` equals the index rebuilt from the tar headers; every manifest row's key, offset and size
    match the tar and the sha256 of its bytes matches; no sample lacks a manifest row; labels in
    ``.cls``/``.lbl`` match; a random ``decode_fraction`` of payloads (at least one per shard) decodes.

    Args:
        out: Dataset root.
        decode_fraction: Fraction of payloads to decode.
        seed: Seed of the decode sample.

    Returns:
        One line per problem found (empty when the dataset is sound).
    """
    out = Path(out)
    info = load_dataset_info(out)
    rng = random.Random(seed)
    problems: list[str] = []
    for split, sp in info.splits.items():
        rows = pq.read_table(out / sp.manifest).to_pylist()
        by_shard: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_shard.setdefault(r["shard"], []).append(r)
        if len(rows) != sp.num_samples:
            problems.append(f"{split}: manifest has {len(rows)} rows, dataset.json says {sp.num_samples}")
        listed = {s.name for s in sp.shards}
        for extra in sorted(set(by_shard) - listed):
            problems.append(f"{split}: manifest rows point at unlisted shard {extra}")
        for shard in sp.shards:
            problems.extend(_verify_shard(out / split, shard, by_shard.get(shard.name, []), decode_fraction, rng))
    return problems


def _label_of(parts: dict[str, bytes]) -> tuple[int | None, int | None]:
    """The labels stored in a sample's :data:`CLS` and :data:`LBL` components (None where missing or unreadable)."""
    try:
        cls = int(parts[CLS])
    except (KeyError, ValueError):
        cls = None
    try:
        lbl = decode_lbl(parts[LBL])
    except (KeyError, FormatError):
        lbl = None
    return cls, lbl


def _verify_shard(split_dir: Path, shard: ShardInfo, rows: list[dict[str, Any]], frac: float,
                  rng: random.Random) -> list[str]:
    name = shard.name
    tar_path, idx_path = split_dir / name, split_dir / shard.index
    if not tar_path.is_file() or not idx_path.is_file():
        return [f"{name}: shard or index file missing"]
    try:
        samples = _read_tar(tar_path)
    except (tarfile.TarError, OSError) as exc:
        return [f"{name}: unreadable tar: {exc}"]
    problems = []
    if len(samples) != shard.num_samples:
        problems.append(f"{name}: {len(samples)} samples in the tar, dataset.json says {shard.num_samples}")
    if idx_path.read_text() != format_index([c for _, c in samples]):
        problems.append(f"{name}: {idx_path.name} does not match the tar (rebuild it with wds2idx)")
    blob = tar_path.read_bytes()
    by_key = {key: comps for key, comps in samples}
    if {r["key"] for r in rows} != set(by_key):
        problems.append(f"{name}: manifest keys and tar keys differ "
                        f"({len(set(by_key) - {r['key'] for r in rows})} samples without a manifest row)")
    n_decode = max(1, round(frac * len(rows)))
    to_decode = set(rng.sample(range(len(rows)), min(n_decode, len(rows))))
    for i, r in enumerate(rows):
        comps = by_key.get(r["key"])
        if comps is None:
            problems.append(f"{name}: {r['key']} in the manifest but not in the tar")
            continue
        media = [loc for loc, _ in comps if loc.ext not in NON_MEDIA]
        payload = [blob[loc.offset : loc.offset + loc.size] for loc in media]
        if media[0].offset != r["offset"] or sum(loc.size for loc in media) != r["bytes"]:
            problems.append(f"{name}: {r['key']} offset/size differ from the manifest")
        if hashlib.sha256(b"".join(payload)).hexdigest() != r["sha256"]:
            problems.append(f"{name}: {r['key']} sha256 differs from the manifest")
        parts = {loc.ext: blob[loc.offset : loc.offset + loc.size] for loc, _ in comps}
        if _label_of(parts) != (r["label"], r["label"]):
            problems.append(f"{name}: {r['key']} label components differ from the manifest label {r['label']}")
        if i in to_decode and (err := _decode(r["format"], payload)) is not None:
            problems.append(f"{name}: {r['key']} does not decode: {err}")
    return problems


def inspect_dataset(out: Path) -> dict[str, Any]:
    """Summarise a dataset: counts, class histogram, payload sizes, formats, quarantine reasons.

    Args:
        out: Dataset root.

    Returns:
        The summary (also what ``prep inspect --json`` prints).
    """
    out = Path(out)
    info = load_dataset_info(out)
    data = info.to_json()
    summary: dict[str, Any] = {"kind": info.kind, "num_classes": info.num_classes, "counts": data["counts"],
                               "quarantine": data["quarantine"], "splits": {}}
    for split, sp in info.splits.items():
        t = pq.read_table(out / sp.manifest).to_pydict()
        hist = Counter(t["label"])
        sizes = sorted(t["bytes"])
        counts = sorted(hist.values()) or [0]
        entry = {
            "samples": len(sizes), "shards": len(sp.shards),
            "total_bytes": sum(sizes),
            "bytes_per_sample": {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]} if sizes else {},
            "shard_bytes_mean": sum(s.bytes for s in sp.shards) / max(len(sp.shards), 1),
            "formats": dict(Counter(t["format"])),
            "classes_present": len(hist),
            "per_class": {"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1]},
            "largest_classes": [[info.classes[k], v] for k, v in hist.most_common(5)],
            "smallest_classes": [[info.classes[k], v] for k, v in sorted(hist.items(), key=lambda kv: kv[1])[:5]],
            "notes": dict(Counter(n for n in t["note"] if n)) if "note" in t else {},
        }
        if info.kind == "video":
            fr = sorted(x for x in t["frames"] if x is not None)
            entry["frames"] = {"min": fr[0], "median": fr[len(fr) // 2], "max": fr[-1]} if fr else {}
        else:
            w, h = sorted(t["width"]), sorted(t["height"])
            entry["median_size"] = [w[len(w) // 2], h[len(h) // 2]] if w else []
        summary["splits"][split] = entry
    return summary


def format_inspect(summary: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_dataset`'s summary."""
    lines = [f"kind {summary['kind']}, {summary['num_classes']} classes, counts {json.dumps(summary['counts'])}"]
    if summary.get("quarantine"):
        q = summary["quarantine"]
        lines.append(f"quarantine: {q['num_samples']} ({json.dumps(q['reasons'])})")
    for split, e in summary["splits"].items():
        lines.append(f"[{split}] {e['samples']} samples in {e['shards']} shards, {e['total_bytes'] / 1e6:.1f} MB, "
                     f"mean shard {e['shard_bytes_mean'] / 1e6:.1f} MB, formats {e['formats']}")
        lines.append(f"  per class min/median/max {e['per_class']['min']}/{e['per_class']['median']}/"
                     f"{e['per_class']['max']} over {e['classes_present']} classes; largest {e['largest_classes']}")
        lines.append(f"  bytes/sample {e['bytes_per_sample']}; " + (f"frames {e['frames']}" if "frames" in e
                                                                  else f"median WxH {e.get('median_size')}"))
        if e["notes"]:
            lines.append(f"  notes {e['notes']}")
    return "\n".join(lines)
