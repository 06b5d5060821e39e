"""The input side of training: shards on disk → batches on the device, one concept per module.

Modules, in the order a sample travels through them:
    shards: shard lists and epoch planning shared by both backends; :class:`~pipeline.data.shards.LoaderError`.
    wds: the ``wds`` backend (webdataset + PIL in DataLoader workers).
    dali: the ``dali`` backend (NVIDIA DALI, GPU or CPU); dali_base: its index-driven sample reader;
        dali_video: its video graphs.
    decode: video decoding (PyAV, DALI) of only the sampled frames; video: clip sampling and clip augmentation.
    sample_transforms: per-sample augmentation, on the CPU in the loader workers.
    batch_augment: per-batch augmentation on the training device (normalisation, erasing, mixup/CutMix).
    loaders: the batch contract and the backend choice (:func:`~pipeline.data.loaders.build_loaders`).

This file imports nothing, so that ``import pipeline.data.shards`` stays light.
"""
