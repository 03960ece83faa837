"""Training and evaluation data: the keyed sample stream (``keyed``), decoding and augmentation (``augment``),
sources (``sources``: digits, ImageFolder), WebDataset shards (``shards``: reader, sampler and the
``python -m fastvit.data.shards`` writer), GPU decoding (``gpu``; ``dali``, an optional extra imported only when
chosen), and ``choose.make_source``, which picks the source that ``--data`` names. Modules of the package import
from these submodules; this file only gathers their names."""
from fastvit.data.augment import (IMAGENET_MEAN, IMAGENET_STD, augment_batch, crop_boxes, decode_image,
                                   decode_pil, eval_transform)
from fastvit.data.choose import make_source
from fastvit.data.keyed import GlobalSampler, keyed_uniform, micro_batch_plan, mix_seed, rank_positions
from fastvit.data.sources import (DECODERS, BadSampleWarning, DataError, DataSource, DigitsSource, FileSource,
                                  FolderSamples, ImageFolderSource, KeyedImages, Samples, dataset_labels,
                                  eval_batches, progress)

__all__ = ["DECODERS", "IMAGENET_MEAN", "IMAGENET_STD", "BadSampleWarning", "DataError", "DataSource",
           "DigitsSource", "FileSource", "FolderSamples", "GlobalSampler", "ImageFolderSource", "KeyedImages",
           "Samples", "augment_batch", "crop_boxes", "dataset_labels", "decode_image", "decode_pil", "eval_batches",
           "eval_transform", "keyed_uniform", "make_source", "micro_batch_plan", "mix_seed", "progress", "rank_positions"]
