"""The input side of training: shards on disk → batches on the device, one concept per module.

Modules, in the order a sample travels through them:
    shards: shard lists, the ``stream`` mode's shard permutation, errors shared by both backends
        (:class:`~pipeline.data.shards.LoaderError`).
    order: exact, elastic epochs — which sample every rank reads at every step (both backends, ``vitpipe order``).
    reader: the sample index from the split manifest and ``pread`` through a bounded set of open files.
    wds: the ``wds`` backend (PIL / PyAV in DataLoader workers; webdataset streams in ``stream`` mode).
    dali: the ``dali`` backend (NVIDIA DALI, GPU or CPU); dali_base: RandAugment spec; dali_video: its video graphs.
    decode: video decoding (PyAV, DALI) of only the sampled frames; video: clip sampling and clip augmentation.
    sample_transforms: per-sample augmentation, on the CPU in the loader workers.
    batch_augment: per-batch augmentation on the training device (normalisation, erasing, mixup/CutMix).
    loaders: the batch contract and the backend choice (:func:`~pipeline.data.loaders.build_loaders`).

This file imports nothing, so that ``import pipeline.data.shards`` (and ``order``, ``reader``: numpy and
pyarrow, no torch) stays light.
"""
