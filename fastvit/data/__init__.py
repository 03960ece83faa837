"""Training and evaluation data: the keyed sample stream (``keyed``), decoding and augmentation (``augment``),
sources (``sources``: digits, ImageFolder), WebDataset shards (``shards``: reader, sampler and the
``python -m fastvit.data.shards`` writer), GPU decoding (``gpu``), and ``make_source``, which picks the source that
``--data`` names."""
from __future__ import annotations

import os

from fastvit.data.augment import IMAGENET_MEAN, IMAGENET_STD, augment_batch, crop_boxes, decode_pil, eval_transform
from fastvit.data.keyed import GlobalSampler, keyed_uniform, micro_batch_plan, mix_seed, rank_positions
from fastvit.data.sources import (DECODERS, BadSampleWarning, DataError, DataSource, DigitsSource, FileSource,
                                  FolderSamples, ImageFolderSource, KeyedImages, Samples, dataset_labels,
                                  eval_batches, progress)

__all__ = ["DECODERS", "IMAGENET_MEAN", "IMAGENET_STD", "BadSampleWarning", "DataError", "DataSource",
           "DigitsSource", "FileSource", "FolderSamples", "GlobalSampler", "ImageFolderSource", "KeyedImages",
           "Samples", "augment_batch", "crop_boxes", "dataset_labels", "decode_pil", "eval_batches", "eval_transform",
           "keyed_uniform", "make_source", "micro_batch_plan", "mix_seed", "progress", "rank_positions"]


def make_source(data: str, img_size: int, workers: int = 4, val_data: str | None = None, decode: str = "cpu",
                device=None) -> DataSource:
    """``'digits'``, an ImageFolder root, a folder with train/ and val/ folders of .tar shards, or a shard pattern
    (with ``val_data``)."""
    from fastvit.data import shards  # here, not above: ``python -m fastvit.data.shards`` runs it as __main__
    if data == "digits":
        if decode != "cpu":
            raise ValueError("--decode gpu decodes JPEG files; --data digits has none (use --decode cpu)")
        return DigitsSource(img_size)
    if shards.is_shard_spec(data):
        return shards.ShardSource(data, val_data, img_size, workers, decode, device)
    if val_data is not None:
        raise ValueError(f"--val-data is for a shard pattern given as --data, got --data {data!r}")
    if not os.path.isdir(data):
        raise ValueError(f"--data must be 'digits', an existing ImageFolder root or WebDataset shards, got {data!r}")
    return ImageFolderSource(data, img_size, workers, decode, device)
