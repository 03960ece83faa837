"""``make_source``: the data source that ``--data`` names (digits, an ImageFolder, or WebDataset shards)."""
from __future__ import annotations

import os

from fastvit.data.sources import DataSource, DigitsSource, ImageFolderSource, decode_problem


def make_source(data: str, img_size: int, workers: int = 4, val_data: str | None = None, decode: str = "cpu",
                device=None) -> DataSource:
    """``'digits'``, an ImageFolder root, a folder with train/ and val/ folders of .tar shards, or a shard pattern
    or a folder of .tar shards (with ``val_data``)."""
    from fastvit.data import shards  # here: ``python -m fastvit.data.shards`` must find it not yet imported
    if data == "digits":
        problem = decode_problem(decode, True, device)
        if problem:
            raise ValueError(problem)
        return DigitsSource(img_size)
    if shards.is_shard_spec(data):
        return shards.ShardSource(data, val_data, img_size, workers, decode, device)
    if val_data is not None:
        raise ValueError(f"--val-data is for a shard pattern given as --data, got --data {data!r}")
    if not os.path.isdir(data):
        raise ValueError(f"--data must be 'digits', an existing ImageFolder root or WebDataset shards, got {data!r}")
    return ImageFolderSource(data, img_size, workers, decode, device)
