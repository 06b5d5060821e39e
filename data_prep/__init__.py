"""Offline dataset preparation for vitpipe: image and video datasets -> WebDataset shards.

Modules:
    format: the on-disk contract shared with the loaders (``dataset.json``, component names, DALI
        index, manifest schema, atomic writes); the only module training code imports.
    scan: ImageFolder scanning (class list and samples).
    walk: the safe walk of a source tree (each real file once; loops, FIFOs, devices reported, never opened).
    imagenet: ImageNet layouts (flat val with devkit or Kaggle CSV labels, synset names) -> plan.
    video_sources: Kinetics, Something-Something v2, Diving48 and generic video lists -> plan.
    plan: the deterministic plan (ordering, shard boundaries, keys, digests, array-task ranges).
    planfile: the plan written once per output directory, read in slices by array tasks.
    images: checking (1/8-scale decode), converting or quarantining one image; optional resize + re-encode.
    pixels: conversions to 8-bit L/RGB (16-bit, float, palette, alpha, ...) and EXIF orientation.
    loading: the bounded reader-thread map and reads that never open a FIFO nor hang on a blocked read.
    video: PyAV re-encoding of one video (window, fps, short side, GOP; h264 / vp9 / JPEG frames).
    probe: header-only image inspection with PIL.
    tarwrite: deterministic tar writer that also writes the DALI ``.idx`` index.
    manifest: parquet tables of the manifests.
    shard: plan (or a task's slice of the plan file) -> shards on a process pool (resumable), merge ->
        manifests + ``dataset.json``.
    verify: ``prep verify`` and ``prep inspect``.
    errors: :class:`~data_prep.errors.PrepError`.

The command line (``vitpipe prep``) lives in :mod:`vitpipe.prep`. This file imports nothing, so that
importing :mod:`data_prep.format` loads no other module of the package; heavy dependencies (numpy,
pyarrow, PIL, av) are imported by the submodules that need them.
"""
