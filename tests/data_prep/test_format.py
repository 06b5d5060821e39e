"""The on-disk contract (data_prep.format): dataset.json versions, DALI index, manifest schema, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from data_prep.format import (
    CLS,
    DATASET_JSON,
    FORMAT_VERSION,
    INDEX_VERSION,
    LBL,
    MANIFEST_COLUMNS,
    META,
    AtomicPath,
    ComponentLocation,
    Counts,
    DatasetInfo,
    FormatError,
    QuarantineInfo,
    ShardInfo,
    SplitInfo,
    atomic_write_bytes,
    decode_lbl,
    format_index,
    frame_ext,
    is_frame_ext,
    label_components,
    load_dataset_info,
    manifest_schema,
    parse_index,
    quarantine_schema,
    read_index,
)

ROOT = Path(__file__).resolve().parents[2]

# Written by `prep_imagefolder` (format 2) before data_prep.format existed: 2 classes with synset names,
# train (7 inputs, one corrupt) and val, shard size 4.
IMAGE_V2 = '''{
  "format_version": 2,
  "kind": "image",
  "classes": [
    "n01",
    "n02"
  ],
  "num_classes": 2,
  "splits": {
    "train": {
      "num_samples": 6,
      "shards": [
        {
          "name": "train-000000.tar",
          "num_samples": 3,
          "index": "train-000000.idx",
          "bytes": 20480
        },
        {
          "name": "train-000001.tar",
          "num_samples": 3,
          "index": "train-000001.idx",
          "bytes": 20480
        }
      ],
      "manifest": "train.parquet",
      "inputs": 7,
      "quarantined": 1
    },
    "val": {
      "num_samples": 2,
      "shards": [
        {
          "name": "val-000000.tar",
          "num_samples": 2,
          "index": "val-000000.idx",
          "bytes": 10240
        }
      ],
      "manifest": "val.parquet",
      "inputs": 2,
      "quarantined": 0
    }
  },
  "counts": {
    "inputs": 9,
    "written": 8,
    "quarantined": 1
  },
  "quarantine": {
    "manifest": "quarantine.parquet",
    "num_samples": 1,
    "reasons": {
      "PIL cannot identify the data as an image (corrupt file or unknown format)": 1
    }
  },
  "options": {
    "shard_size": 4,
    "decode_check": true,
    "max_pixels": 89478485,
    "quality": 90,
    "resize": null,
    "seed": 0
  },
  "settings": {
    "max_failure_rate": 0.5
  },
  "warnings": [],
  "class_names": [
    "tench, Tinca tinca",
    "goldfish"
  ]
}
'''

# Written by `vitpipe prep videolist --codec jpeg ... --nodes 2` (format 2) before data_prep.format existed:
# a missing clip, class names from --classes, the train layout in settings and the shard-count warning.
VIDEO_V2 = '''{
  "format_version": 2,
  "kind": "video",
  "classes": [
    "zero",
    "one"
  ],
  "num_classes": 2,
  "splits": {
    "train": {
      "num_samples": 3,
      "shards": [
        {
          "name": "train-000000.tar",
          "num_samples": 2,
          "index": "train-000000.idx",
          "bytes": 51200
        },
        {
          "name": "train-000001.tar",
          "num_samples": 1,
          "index": "train-000001.idx",
          "bytes": 30720
        }
      ],
      "manifest": "train.parquet",
      "inputs": 4,
      "quarantined": 1
    }
  },
  "counts": {
    "inputs": 4,
    "written": 3,
    "quarantined": 1
  },
  "quarantine": {
    "manifest": "quarantine.parquet",
    "num_samples": 1,
    "reasons": {
      "video file not found": 1
    }
  },
  "options": {
    "shard_size": 2,
    "codec": "jpeg",
    "crf": 23,
    "fps": 12.0,
    "keyint": 8,
    "max_seconds": 60.0,
    "quality": 90,
    "seed": 0,
    "short_side": 24
  },
  "settings": {
    "max_failure_rate": 0.5,
    "train_layout": {
      "gpus_per_node": 8,
      "loader_workers": 8,
      "nodes": 2
    }
  },
  "warnings": [
    "train has 2 shards, fewer than nodes x GPUs x loader workers = 2 x 8 x 8 = 128: some loader workers would get no shard; lower --shard-size"
  ],
  "class_names": [
    "zero",
    "one"
  ]
}
'''  # noqa: E501 - the file as written

# Format 1 (the first sharder): no shard bytes, no split inputs/quarantined, no counts, quarantine, settings,
# warnings or class names; files that could not be read were listed under "skipped".
IMAGE_V1 = {
    "format_version": 1,
    "kind": "image",
    "classes": ["n01", "n02"],
    "num_classes": 2,
    "splits": {
        "train": {"num_samples": 5,
                  "shards": [{"name": "train-000000.tar", "num_samples": 4, "index": "train-000000.idx"},
                             {"name": "train-000001.tar", "num_samples": 1, "index": "train-000001.idx"}],
                  "manifest": "train.parquet"},
        "val": {"num_samples": 2, "shards": [{"name": "val-000000.tar", "num_samples": 2, "index": "val-000000.idx"}],
                "manifest": "val.parquet"},
    },
    "skipped": [{"split": "train", "source": "train/n02/bad.JPEG", "reason": "cannot identify image file 'x'"},
                {"split": "train", "source": "train/n01/gone.JPEG", "reason": "cannot read file: No such file"}],
    "options": {"shard_size": 4, "seed": 0},
}


# ---------------------------------------------------------------- dataset.json


@pytest.mark.parametrize("text", [IMAGE_V2, VIDEO_V2], ids=["image", "video"])
def test_format2_file_loads_and_round_trips_byte_identically(text: str, tmp_path: Path) -> None:
    (tmp_path / DATASET_JSON).write_text(text, encoding="utf-8")
    info = load_dataset_info(tmp_path)
    assert info.format_version == FORMAT_VERSION == 2
    assert info.dumps() == text
    assert json.dumps(info.to_json(), indent=2, ensure_ascii=False) + "\n" == text
    assert DatasetInfo.from_json(json.loads(text), "x") == info
    (tmp_path / "again").mkdir()
    info.write(tmp_path / "again")
    assert (tmp_path / "again" / DATASET_JSON).read_bytes() == text.encode("utf-8")


def test_format2_fields_are_typed(tmp_path: Path) -> None:
    (tmp_path / DATASET_JSON).write_text(VIDEO_V2)
    info = load_dataset_info(tmp_path / DATASET_JSON)
    assert info.kind == "video" and info.classes == ("zero", "one") and info.num_classes == 2
    assert info.class_names == ("zero", "one")
    train = info.split("train")
    assert train == SplitInfo(3, (ShardInfo("train-000000.tar", 2, "train-000000.idx", 51200),
                                  ShardInfo("train-000001.tar", 1, "train-000001.idx", 30720)),
                              "train.parquet", inputs=4, quarantined=1)
    assert info.counts == Counts(inputs=4, written=3, quarantined=1)
    assert info.quarantine == QuarantineInfo("quarantine.parquet", 1, {"video file not found": 1})
    assert info.options["codec"] == "jpeg" and info.options["fps"] == 12.0
    assert info.settings["train_layout"]["nodes"] == 2 and info.settings["max_failure_rate"] == 0.5
    assert len(info.warnings) == 1 and "fewer than nodes x GPUs" in info.warnings[0]
    with pytest.raises(FormatError, match=r"dataset.json: no split 'val'; it has train"):
        info.split("val")
    image = DatasetInfo.from_json(json.loads(IMAGE_V2), "image")
    assert list(image.splits) == ["train", "val"] and image.settings == {"max_failure_rate": 0.5}


def test_to_json_returns_a_copy() -> None:
    info = DatasetInfo.from_json(json.loads(VIDEO_V2), "v")
    data = info.to_json()
    data["settings"]["train_layout"]["nodes"] = 99
    data["options"]["codec"] = "vp9"
    assert info.to_json() == json.loads(VIDEO_V2)


def test_format1_file_loads_with_defaults(tmp_path: Path) -> None:
    (tmp_path / DATASET_JSON).write_text(json.dumps(IMAGE_V1, indent=2))
    info = load_dataset_info(tmp_path)
    assert info.format_version == 1 and info.kind == "image" and info.classes == ("n01", "n02")
    assert [s.bytes for s in info.split("train").shards] == [0, 0]
    assert info.split("train").shards[1] == ShardInfo("train-000001.tar", 1, "train-000001.idx", 0)
    assert (info.split("train").inputs, info.split("train").quarantined) == (7, 2)
    assert (info.split("val").inputs, info.split("val").quarantined) == (2, 0)
    assert info.counts == Counts(inputs=9, written=7, quarantined=2)
    assert info.quarantine == QuarantineInfo("", 2, {"cannot identify image file 'x'": 1, "cannot read file": 1})
    assert info.options == {"shard_size": 4, "seed": 0}
    assert info.settings == {} and info.warnings == () and info.class_names is None


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(format_version=3), r"unsupported format_version 3 \(expected one of \(1, 2\)\)"),
    (lambda d: d.pop("format_version"), r"unsupported format_version None"),
    (lambda d: d.pop("classes"), r"x.json: classes is missing"),
    (lambda d: d.update(num_classes=5), r"num_classes 5 but 2 classes"),
    (lambda d: d.update(kind="audio"), r"kind 'audio' is not one of"),
    (lambda d: d["splits"]["train"]["shards"][1].pop("bytes"), r"splits.train.shards\[1\].bytes is missing"),
    (lambda d: d["splits"]["val"].update(num_samples="2"), r"splits.val.num_samples must be int, got str"),
    (lambda d: d["counts"].update(written=True), r"counts.written must be int, got bool"),
    (lambda d: d.update(classes=["a", 2]), r"classes must hold str values only"),
])
def test_malformed_dataset_json(edit, message: str) -> None:  # noqa: ANN001 - a lambda
    data = json.loads(IMAGE_V2)
    edit(data)
    with pytest.raises(FormatError, match=message):
        DatasetInfo.from_json(data, "x.json")


def test_load_dataset_info_errors(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=f"{tmp_path} is not a vitpipe dataset: no dataset.json"):
        load_dataset_info(tmp_path)
    (tmp_path / DATASET_JSON).write_text("{not json")
    with pytest.raises(FormatError, match="dataset.json: cannot read dataset description"):
        load_dataset_info(tmp_path)
    (tmp_path / DATASET_JSON).write_text("[1, 2]")
    with pytest.raises(FormatError, match=r"dataset.json: unsupported format_version None"):
        load_dataset_info(tmp_path)
    assert issubclass(FormatError, ValueError)


# ---------------------------------------------------------------- components


def test_component_names_and_label_encoding() -> None:
    assert (CLS, LBL, META) == ("cls", "lbl", "json")
    assert [frame_ext(i) for i in (0, 1, 12345)] == ["f0000.jpg", "f0001.jpg", "f12345.jpg"]
    assert is_frame_ext("f0007.jpg") and not is_frame_ext("jpg") and not is_frame_ext("f7.jpg")
    assert label_components(11) == [("cls", b"11"), ("lbl", (11).to_bytes(8, "little", signed=True))]
    assert decode_lbl(label_components(-3)[1][1]) == -3
    with pytest.raises(FormatError, match="lbl component has 2 bytes"):
        decode_lbl(b"ab")


# ---------------------------------------------------------------- DALI index

SAMPLES = [
    [(ComponentLocation("jpg", 512, 700), "train_00000000.jpg"),
     (ComponentLocation("cls", 1536, 1), "train_00000000.cls")],
    [(ComponentLocation("f0000.jpg", 2560, 9), "train_00000002.f0000.jpg")],
]


def test_index_round_trip(tmp_path: Path) -> None:
    text = format_index(SAMPLES)
    assert text == (f"{INDEX_VERSION} 2\njpg 512 700 train_00000000.jpg cls 1536 1 train_00000000.cls\n"
                    "f0000.jpg 2560 9 train_00000002.f0000.jpg\n")
    expected = [{"jpg": (512, 700), "cls": (1536, 1)}, {"f0000.jpg": (2560, 9)}]
    assert parse_index(text, "x.idx") == expected
    (tmp_path / "a.idx").write_text(text)
    assert read_index(tmp_path / "a.idx") == expected
    assert parse_index("v1.2 0\n", "empty.idx") == []


@pytest.mark.parametrize(("text", "message"), [
    ("", r"x.idx: not a DALI index file \(run `vitpipe prep verify`\)"),
    ("jpg 0 1 a.jpg\n", "not a DALI index file"),
    ("v2.0 1\njpg 0 1 a.jpg\n", "not a DALI index file"),
    ("v1.2 one\njpg 0 1 a.jpg\n", "not a DALI index file"),
    ("v1.2 1\njpg 0 1\n", r"x.idx: malformed index line 'jpg 0 1'"),
    ("v1.2 1\njpg zero 1 a.jpg\n", "malformed index line"),
    ("v1.2 1\njpg 0 -1 a.jpg\n", "malformed index line"),
    ("v1.2 2\n\njpg 0 1 a.jpg\n", "malformed index line ''"),
    ("v1.2 2\njpg 0 1 a.jpg\n", "the header announces 2 samples but 1 lines follow"),
])
def test_malformed_index(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_index(text, "x.idx")


def test_read_index_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot read the DALI index"):
        read_index(tmp_path / "none.idx")


# ---------------------------------------------------------------- manifests


def test_manifest_schema_matches_the_row_type() -> None:
    from data_prep.manifest import MANIFEST_SCHEMA, QUARANTINE_SCHEMA, ManifestRow

    assert [f.name for f in fields(ManifestRow)] == [c.name for c in MANIFEST_COLUMNS] == MANIFEST_SCHEMA.names
    assert manifest_schema() is MANIFEST_SCHEMA and quarantine_schema() is QUARANTINE_SCHEMA
    assert MANIFEST_SCHEMA.metadata == {b"vitpipe.manifest_version": b"2"}
    assert [(f.name, str(f.type), f.nullable) for f in QUARANTINE_SCHEMA] == [
        ("split", "string", False), ("key", "string", True), ("source", "string", False), ("reason", "string", False)]
    assert str(MANIFEST_SCHEMA.field("frames").type) == "int32" and MANIFEST_SCHEMA.field("fps").nullable


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_bytes(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two" and os.stat(target).st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError), AtomicPath(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary file left behind


# ---------------------------------------------------------------- imports


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_importing_format_loads_only_the_standard_library() -> None:
    loaded = _modules_after("import data_prep.format")
    heavy = {m for m in loaded if m.split(".")[0] in ("pyarrow", "PIL", "numpy", "torch", "av", "webdataset")}
    assert not heavy
    assert {m for m in loaded if m.startswith("data_prep")} == {"data_prep", "data_prep.format"}


def test_prep_command_does_not_import_torch(tmp_path: Path) -> None:
    """``vitpipe prep`` (what the Slurm templates run) and ``vitpipe.prep.main`` load no training stack."""
    loaded = _modules_after(f"from vitpipe.prep import main\nassert main(['prep', 'merge', {str(tmp_path)!r}]) == 2")
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "pipeline", "model")}
    loaded = _modules_after(f"import runpy, sys\nsys.argv = ['vitpipe', 'prep', 'merge', {str(tmp_path)!r}]\n"
                            "try:\n    runpy.run_module('vitpipe', run_name='__main__')\nexcept SystemExit as e:\n"
                            "    assert e.code == 2")
    assert "vitpipe.prep" in loaded and not {m for m in loaded if m.split(".")[0] in ("torch", "model")}
