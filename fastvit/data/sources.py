"""Data sources for the trainer: sizes, the sample stream's sampler, a loader of augmented micro-batches for a
``micro_batch_plan`` and the evaluation sets.

Sources: ``digits`` (scikit-learn's bundled 8x8 digits, no download), an ImageFolder tree with ``train/`` and
``val/`` (or ``test/``) sub-folders, and WebDataset tar shards (``fastvit.data.shards``). Images from files are read
and decoded by index (``Samples``); one that cannot be read or decoded is replaced by another sample chosen by a
hash of (seed, step, position, attempt), so every split over ranks and every resume replaces it the same way, and it
is reported with the micro-batch (``bad``) for the trainer to count.
"""
from __future__ import annotations

import abc
import functools
import hashlib
import importlib.util
import io
import os
import sys
import warnings
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from fastvit.data.augment import EVAL_CFG, UNIFORMS, crop_flip, decode_image, eval_transform, normalise
from fastvit.data.gpu import GpuDecoder
from fastvit.data.keyed import MAX_REPLACEMENTS, GlobalSampler, keyed_uniform, replacement_index

DECODERS = ("cpu", "gpu", "dali")
ENCODED = ("gpu", "dali")  # the decoders to which the loader workers hand encoded bytes


class DataError(RuntimeError):
    """The data cannot be trained on: too many unreadable samples (``--max-bad-frac``), or no readable one."""


class BadSampleWarning(UserWarning):
    """An unreadable or undecodable sample, replaced (training) or left out (evaluation)."""


@dataclass
class DataSource(abc.ABC):
    """What the trainer needs from a dataset: sizes, a batch maker for the plan and evaluation sets."""
    num_classes: int
    num_train: int
    train_eval: torch.utils.data.Dataset  # training images with the evaluation transform (few-shot features)
    test: torch.utils.data.Dataset
    preprocessing: ClassVar[dict]  # the evaluation transform as timm's pretrained_cfg keys (mean, std, crop, ...)

    def sampler(self, seed: int):
        """Stream position -> training-set index (``GlobalSampler``: each epoch a seeded permutation)."""
        return GlobalSampler(self.num_train, seed)

    def fingerprint(self) -> str | None:
        """A digest of the training samples (``Samples.fingerprint``), None where they are fixed (digits)."""
        return None

    def eval_workers(self, workers: int) -> int:
        """Loader processes worth starting for the evaluation sets: ``workers``, where images are decoded."""
        return workers

    @abc.abstractmethod
    def loader(self, plan, seed):
        """Iterate augmented (x, y, bad) micro-batches for a ``micro_batch_plan``; bad lists the (sample name,
        reason) of each unreadable sample that was replaced."""


class DigitsSource(DataSource):
    """scikit-learn's 1797 8x8 digits, upsampled to ``img_size`` RGB; fixed stratified 80/20 split."""

    preprocessing = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "crop_pct": 1.0,
                     "crop_mode": "center"}

    def __init__(self, img_size: int):
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError as e:
            raise ImportError("--data digits needs scikit-learn (pip install scikit-learn), which ships the "
                              "images") from e

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
        labels = torch.tensor(digits.target, dtype=torch.long)
        train_idx, test_idx = train_test_split(range(len(labels)), test_size=0.2, random_state=0,
                                               stratify=digits.target)
        self.img_size = img_size
        self.train_images, self.train_labels = images[train_idx], labels[train_idx]
        train_eval = RenderedDigits(self.render, self.train_images, self.train_labels)
        test = RenderedDigits(self.render, images[test_idx], labels[test_idx])
        super().__init__(10, len(train_idx), train_eval, test)

    def render(self, images, theta=None):
        """Resample 8x8 images to img_size x img_size through an affine map (identity: bilinear upsampling),
        replicate to 3 channels and normalise to [-1, 1]."""
        if theta is None:
            theta = torch.eye(2, 3).expand(len(images), 2, 3)
        grid = F.affine_grid(theta, [len(images), 1, self.img_size, self.img_size], align_corners=False)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return (out.expand(-1, 3, -1, -1) - 0.5) / 0.5

    @staticmethod
    def random_affine(u: torch.Tensor) -> torch.Tensor:
        """(B, 4) uniforms -> (B, 2, 3) affine maps: scale 0.9-1.1, rotation +-10 degrees, shift +-0.15 of the
        image (no flips: digits are not mirror-symmetric)."""
        u = (2 * u - 1).float()
        scale, angle = 1 + 0.1 * u[:, 0], torch.deg2rad(10 * u[:, 1])
        c, s = torch.cos(angle) / scale, torch.sin(angle) / scale
        return torch.stack([torch.stack([c, -s, 0.15 * u[:, 2]], 1), torch.stack([s, c, 0.15 * u[:, 3]], 1)], 1)

    def eval_workers(self, workers: int) -> int:
        return 0  # rendered in memory: nothing to decode in other processes

    def batch(self, items, seed):
        """Images and labels of (dataset index, step, position) items, augmented by keyed randomness."""
        idx = torch.tensor([i for i, _, _ in items])
        steps = sorted({s for _, s, _ in items})
        if len(steps) != 1:
            raise ValueError(f"a micro-batch must come from one step, got items of steps {steps}")
        theta = self.random_affine(keyed_uniform(seed, steps[0], [p for _, _, p in items], 4))
        return self.render(self.train_images[idx], theta), self.train_labels[idx]

    def loader(self, plan, seed):
        return (self.batch(items, seed) + ([],) for items in plan)


class RenderedDigits(torch.utils.data.Dataset):
    """8x8 digits rendered (``DigitsSource.render``) when read, not up front: all 1797 at 384 px would hold 3 GiB
    and take half a minute to render before the first step."""

    def __init__(self, render, images: torch.Tensor, labels: torch.Tensor):
        self.render, self.images, self.targets = render, images, labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.render(self.images[index:index + 1])[0], self.targets[index]

    def __getitems__(self, indices: list[int]):
        """A DataLoader's batch rendered in one call (``Subset`` and the default fetcher use it)."""
        return list(zip(self.render(self.images[indices]), self.targets[indices]))


class Samples(abc.ABC):
    """Encoded images and their labels, read by index: an ImageFolder's files or the samples of tar shards."""

    labels: np.ndarray  # (n,) int64 class of every sample, known without reading images

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def read(self, index: int) -> bytes:
        """The encoded image of sample ``index`` (raises OSError when it cannot be read)."""

    @abc.abstractmethod
    def name(self, index: int) -> str:
        """The sample's file path or shard and key, for messages."""

    def sampler(self, seed: int):
        """The order to read them in, stream position -> index: a seeded permutation per epoch (``GlobalSampler``);
        shards read whole windows of shards instead (``ShardSampler``)."""
        return GlobalSampler(len(self), seed)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of which samples these are, in order: their labels and :meth:`_identity`. A run records it, so
        that a resume on a training set of the same size but other content (files added and removed, shards
        rewritten) is told that it no longer draws what an uninterrupted run would."""
        digest = hashlib.blake2b(self.labels.tobytes(), digest_size=8)
        digest.update(self._identity())
        return digest.hexdigest()

    @abc.abstractmethod
    def _identity(self) -> bytes:
        """What names the samples apart from their labels, independent of where the dataset lies."""


class FolderSamples(Samples):
    """The image files of an ImageFolder tree (one sub-folder per class, classes in sorted order)."""

    def __init__(self, root: str):
        from torchvision import datasets
        if os.path.isdir(root):
            with os.scandir(root) as entries:  # closed even where any() stops early
                classless = not any(entry.is_dir() for entry in entries)
            if classless:
                raise ValueError(f"{root} holds no class folders: --data takes an ImageFolder "
                                 f"(root/train/<class>/*.jpg) or WebDataset shards (root/train/*.tar), and this folder "
                                 f"has neither")
        try:
            folder = datasets.ImageFolder(root)
        except FileNotFoundError as e:  # torchvision's message names the class, not where it is
            raise ValueError(f"ImageFolder {root}: {e}".rstrip() + "; every class folder needs at least one image")
        self.root, self.classes, self.paths = folder.root, folder.classes, [path for path, _ in folder.samples]
        self.labels = np.asarray(folder.targets, dtype=np.int64)

    def read(self, index):
        with open(self.paths[index], "rb") as f:
            return f.read()

    def name(self, index):
        return self.paths[index]

    def _identity(self):
        skip = len(os.path.join(self.root, ""))  # the paths relative to the root: a moved dataset is the same one
        return "\n".join(path[skip:] for path in self.paths).encode(errors="surrogateescape")


def _check_header(data: bytes) -> tuple[bytes, int, int]:
    """For GPU decoding: fail now on what is not an image at all (PIL parses only the header); (data, height,
    width)."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return data, height, width


class SampleKey(NamedTuple):
    """Which sample filled a position of a step (``index``: the one read, a substitute's when the drawn one was
    unreadable), and its image size (what the crop box is drawn from, for decoders that crop while decoding)."""
    index: int
    step: int
    pos: int
    height: int
    width: int


class KeyedImages(torch.utils.data.Dataset):
    """Training samples addressed by (index, step, position): read, decoded (``decode='cpu'``: decoded, cropped and
    flipped in the worker, a uint8 image; ``'gpu'`` / ``'dali'``: the encoded bytes, decoded later on the GPU), and
    replaced by a keyed substitute when unreadable. An item is (image, label, uniforms, bad, ``SampleKey``), bad a
    list of (sample name, reason)."""

    def __init__(self, samples: Samples, img_size: int, seed: int, decode: str = "cpu"):
        self.samples, self.img_size, self.seed, self.decode = samples, img_size, seed, decode

    def __len__(self):
        return len(self.samples)

    def fetch(self, index, step, pos, decode, attempt=0):
        """(decoded or checked image, label, bad, index read) of ``index``, or of its replacements from ``attempt``
        on (``keyed.replacement_index``)."""
        bad = []
        for k in range(attempt, attempt + MAX_REPLACEMENTS + 1):
            if k > 0:
                index = replacement_index(self.seed, step, pos, k, len(self.samples))
            try:
                return decode(self.samples.read(index)), int(self.samples.labels[index]), bad, index
            except Exception as e:  # noqa: BLE001  anything a broken file makes PIL or the reader raise
                bad.append((self.samples.name(index), f"{type(e).__name__}: {e}".splitlines()[0][:200]))
        raise DataError(f"{len(bad)} samples in a row could not be read or decoded (last: {bad[-1][0]}: "
                        f"{bad[-1][1]}); the training data looks broken")

    def __getitem__(self, item):
        index, step, pos = item
        u = keyed_uniform(self.seed, step, [pos], UNIFORMS)
        if self.decode in ENCODED:
            (data, height, width), label, bad, index = self.fetch(index, step, pos, _check_header)
            key = SampleKey(index, step, pos, height, width)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, u[0], bad, key
        image, label, bad, index = self.fetch(index, step, pos, decode_image)
        key = SampleKey(index, step, pos, image.shape[1], image.shape[2])
        return crop_flip([image], u, self.img_size)[0], label, u[0], bad, key


def collate(items):
    """Micro-batch of KeyedImages items: (images stacked, or a list of encoded ones), labels, uniforms, bad, and
    the ``SampleKey`` of each (for crops and replacements decided after the loader, on the GPU paths)."""
    images, labels, u, bad, keys = zip(*items)
    stacked = torch.stack(images) if images[0].ndim == 3 else list(images)
    return stacked, torch.tensor(labels), torch.stack(u), [b for per in bad for b in per], list(keys)


class EvalImages(torch.utils.data.Dataset):
    """Samples with the evaluation transform; an unreadable one becomes a blank image with label -1 (left out of
    the accuracy) and a warning naming it."""

    def __init__(self, samples: Samples, img_size: int):
        self.samples, self.img_size = samples, img_size
        self.targets = samples.labels  # dataset_labels() reads labels without images

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        try:
            image = decode_image(self.samples.read(index))
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"unreadable sample {self.samples.name(index)} ({type(e).__name__}: {e}); left out of "
                          f"evaluation", BadSampleWarning)
            return torch.zeros(3, self.img_size, self.img_size), -1
        return eval_transform(image, self.img_size), int(self.samples.labels[index])


def leave_stops_to_the_parent(worker_id: int):
    """A loader worker leaves the trainer's process group: a scheduler, torchrun or a terminal signals the whole
    group (SIGTERM, Ctrl-C), and a worker killed by it would end the run before the trainer saves at the end of the
    step. The trainer still stops its workers itself (and a worker whose parent dies exits by itself)."""
    os.setpgid(0, 0)


def decode_problem(decode: str, digits: bool, device) -> str | None:
    """Why ``--decode decode`` cannot run on the ``digits`` dataset or not and ``device`` (None: the CPU), or None
    when it can; the trainer's flag check and the data sources both ask."""
    if decode not in DECODERS:
        return f"--decode must be one of {DECODERS}, got {decode!r}"
    if decode == "cpu":
        return None
    if digits:
        return f"--decode {decode} decodes image files; --data digits has none (use --decode cpu)"
    if device is None or torch.device(device).type != "cuda":
        return (f"--decode {decode} needs a CUDA device (got {device or 'none: no CUDA device here, or --device cpu'}"
                "); use --decode cpu")
    if decode == "dali" and importlib.util.find_spec("nvidia.dali") is None:
        return ("--decode dali needs NVIDIA DALI (pip install -e \".[dali]\", or the nvidia-dali-cudaXXX wheel of "
                "your CUDA version); --decode gpu needs only torchvision")
    return None


class FileSource(DataSource):
    """Images read from files (ImageFolder) or shards: keyed random resized crop + flip for training (decoded on
    the CPU in loader workers, or on the GPU), resize + centre crop (ratio 0.875) for evaluation."""

    preprocessing = EVAL_CFG

    def __init__(self, train: Samples, test: Samples, img_size: int, workers: int = 4, decode: str = "cpu",
                 device=None, num_classes: int | None = None):
        problem = decode_problem(decode, False, device)
        if problem:
            raise ValueError(problem)
        self.train_samples, self.img_size, self.workers, self.decode = train, img_size, workers, decode
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        num_classes = num_classes or int(max(train.labels.max(), test.labels.max())) + 1
        super().__init__(num_classes, len(train), EvalImages(train, img_size), EvalImages(test, img_size))

    def sampler(self, seed):
        return self.train_samples.sampler(seed)

    def fingerprint(self):
        return self.train_samples.fingerprint

    def keyed(self, seed) -> KeyedImages:
        return KeyedImages(self.train_samples, self.img_size, seed, self.decode)

    def loader(self, plan, seed):
        dataset = self.keyed(seed)
        batches = torch.utils.data.DataLoader(dataset, batch_sampler=plan, num_workers=self.workers,
                                              collate_fn=collate, pin_memory=torch.cuda.is_available(),
                                              generator=_own_generator(seed), worker_init_fn=leave_stops_to_the_parent)
        if self.decode == "cpu":  # uint8 crops from the workers, normalised on the training device
            return ((normalise(x.to(self.device, non_blocking=True)), y, bad) for x, y, _, bad, _ in batches)
        if self.decode == "dali":
            from fastvit.data.dali import DaliDecoder  # an optional extra, imported only when chosen
            return DaliDecoder(dataset, self.device).batches(batches)
        return GpuDecoder(dataset, self.device).batches(batches)


class ImageFolderSource(FileSource):
    """``root/train`` and ``root/val`` (or ``root/test``) class folders."""

    def __init__(self, root: str, img_size: int, workers: int = 4, decode: str = "cpu", device=None):
        split = next((s for s in ("val", "test") if os.path.isdir(os.path.join(root, s))), None)
        if not os.path.isdir(os.path.join(root, "train")) or split is None:
            raise ValueError(f"--data {root!r} must be 'digits', a folder with train/ and val/ (or test/) "
                             f"ImageFolder sub-folders (one folder per class), or WebDataset shards")
        train, test = FolderSamples(os.path.join(root, "train")), FolderSamples(os.path.join(root, split))
        if test.classes != train.classes:
            raise ValueError(f"{root}/{split} has classes {test.classes[:5]}..., unlike train/ "
                             f"{train.classes[:5]}...")
        super().__init__(train, test, img_size, workers, decode, device)


def progress(iterable=None, **kwargs):
    """A tqdm bar that refreshes at most every 10 s when stderr is not a terminal (CI logs stay short); there a
    bar inside another (evaluation during training) is left out: nesting moves the cursor by escape codes, which a
    log file keeps as garbage."""
    from tqdm import tqdm
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 10.0)
        if getattr(tqdm, "_instances", None):
            kwargs["disable"] = True
    kwargs.setdefault("mininterval", 0.1)
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def _own_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator: each iterator it starts draws its workers' base seed from it instead of from
    torch's global one, which is the dropout and drop-path stream a checkpoint saves (a resumed run starts its
    loader after restoring that stream: one draw there would shift every dropout mask after it). The samples do
    not depend on it: their augmentation is keyed by (seed, index)."""
    return torch.Generator().manual_seed(seed)


def eval_batches(dataset, batch_size: int, world: int = 1, rank: int = 0, workers: int = 0, desc: str | None = None):
    """Yield (x, y, valid) batches of this rank's shard; every rank yields the same number of batches (padded with
    sample 0 and ``valid`` False), so sharded models see matching collectives. ``desc``: a progress bar with that
    label on rank 0, removed when done."""
    n = len(dataset)
    per_rank = -(-n // world)
    idx = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    valid = torch.arange(per_rank) < len(idx)
    idx += [0] * (per_rank - len(idx))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size,
                                         num_workers=workers, generator=_own_generator(0),
                                         worker_init_fn=leave_stops_to_the_parent)
    batches = progress(loader, desc=desc, leave=False, disable=desc is None or rank != 0)
    for i, (x, y) in enumerate(batches):
        yield x, y, valid[i * batch_size:i * batch_size + len(y)]


def dataset_labels(dataset) -> torch.Tensor:
    """All labels of a dataset without loading images where the dataset knows them (ImageFolder, TensorDataset)."""
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets)
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return dataset.tensors[1]
    return torch.as_tensor([dataset[i][1] for i in range(len(dataset))])
