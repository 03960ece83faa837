"""Training data whose content does not depend on how a global batch is split over ranks and micro-batches.

Every sample of a run has a *stream position*: epoch e is a permutation of the training set seeded by
(seed, e), and the epochs are concatenated. Step s takes the next ``global_batch`` positions; the augmentation
randomness of a sample is a hash of (seed, s, position in the global batch): counter-based uniforms for digits,
torch's RNG seeded from the hash around each ImageFolder transform. Which rank or
micro-batch computes a sample therefore changes nothing, so 1 rank x 4 accumulation steps and 2 ranks x 2 give the
same gradients, and a resumed run (which restarts the stream at the saved position) sees the same batches.

Sources: ``digits`` (scikit-learn's bundled 8x8 digits, no download) and an ImageFolder tree with ``train/`` and
``val/`` (or ``test/``) sub-folders.
"""
from __future__ import annotations

import abc
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_MASK64 = (1 << 64) - 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _mix(h, value):
    """One splitmix64 round of ``h ^ value`` in numpy's wrapping uint64 arithmetic (scalars or arrays)."""
    with np.errstate(over="ignore"):
        x = (h ^ value) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, index, ...); unlike ``hash`` it is the same in every process."""
    h = np.uint64(0)
    for p in parts:
        h = _mix(h, np.uint64(int(p) & _MASK64))
    return int(h) >> 1


def keyed_uniform(seed: int, step: int, positions, count: int) -> torch.Tensor:
    """(len(positions), count) uniforms in [0, 1), each a hash of (seed, step, position, k): counter-based
    randomness, vectorised over positions and k with the same ``_mix`` as ``mix_seed``."""
    h = _mix(np.uint64(0), np.uint64(seed & _MASK64))
    h = _mix(h, np.uint64(step & _MASK64))
    h = _mix(h, np.asarray(positions, dtype=np.uint64)[:, None])
    h = _mix(h, np.arange(count, dtype=np.uint64)[None, :])
    return torch.from_numpy((h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)


class GlobalSampler:
    """Maps stream positions to dataset indices: epoch e is ``randperm(n)`` seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError(f"the training set is empty (n={n})")
        self.n, self.seed = n, seed
        self._perms = {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0x5EED, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def index(self, position: int) -> int:
        return self._perm(position // self.n)[position % self.n]


def rank_positions(global_batch: int, micro: int, world: int, rank: int, micro_step: int) -> range:
    """Positions in the global batch that ``rank`` computes at accumulation step ``micro_step``."""
    start = (micro_step * world + rank) * micro
    return range(start, start + micro)


def micro_batch_plan(sampler: GlobalSampler, seed: int, start_step: int, samples_seen: int, steps: int,
                     global_batch: int, micro: int, world: int, rank: int):
    """Yield, for every step from ``start_step`` and every accumulation step, this rank's list of
    ``(dataset_index, step, position)`` items; ``samples_seen`` is the stream position of ``start_step``."""
    accum = global_batch // (micro * world)
    for step in range(start_step, steps):
        base = samples_seen + (step - start_step) * global_batch
        for j in range(accum):
            yield [(sampler.index(base + p), step, p) for p in rank_positions(global_batch, micro, world, rank, j)]


@dataclass
class DataSource(abc.ABC):
    """What the trainer needs from a dataset: sizes, a batch maker for the plan and evaluation sets."""
    num_classes: int
    num_train: int
    train_eval: torch.utils.data.Dataset  # training images with the evaluation transform (few-shot features)
    test: torch.utils.data.Dataset

    @abc.abstractmethod
    def loader(self, plan, seed):
        """Iterate augmented (x, y) micro-batches for a ``micro_batch_plan``."""


class DigitsSource(DataSource):
    """scikit-learn's 1797 8x8 digits, upsampled to ``img_size`` RGB; fixed stratified 80/20 split."""

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
        train_eval = torch.utils.data.TensorDataset(self.render(self.train_images), self.train_labels)
        test = torch.utils.data.TensorDataset(self.render(images[test_idx]), labels[test_idx])
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

    def batch(self, items, seed):
        """Images and labels of (dataset index, step, position) items, augmented by keyed randomness."""
        idx = torch.tensor([i for i, _, _ in items])
        steps = sorted({s for _, s, _ in items})
        if len(steps) != 1:
            raise ValueError(f"a micro-batch must come from one step, got items of steps {steps}")
        theta = self.random_affine(keyed_uniform(seed, steps[0], [p for _, _, p in items], 4))
        return self.render(self.train_images[idx], theta), self.train_labels[idx]

    def loader(self, plan, seed):
        return (self.batch(items, seed) for items in plan)


class _KeyedImageFolder(torch.utils.data.Dataset):
    """ImageFolder whose ``__getitem__`` takes (index, step, position) and seeds the transform's RNG from it."""

    def __init__(self, folder, transform, seed):
        self.folder, self.transform, self.seed = folder, transform, seed

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, item):
        index, step, pos = item
        path, label = self.folder.samples[index]
        image = self.folder.loader(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, step, pos))
            return self.transform(image), label


class ImageFolderSource(DataSource):
    """``root/train`` and ``root/val`` (or ``root/test``) class folders; random resized crop + flip for training,
    resize + center crop (ratio 0.875) for evaluation."""

    def __init__(self, root: str, img_size: int, workers: int = 4):
        from torchvision import datasets, transforms

        split = next((s for s in ("val", "test") if os.path.isdir(os.path.join(root, s))), None)
        if not os.path.isdir(os.path.join(root, "train")) or split is None:
            raise ValueError(f"--data {root!r} must be 'digits' or a folder with train/ and val/ (or test/) "
                             f"ImageFolder sub-folders (one folder per class)")
        norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        eval_tf = transforms.Compose([transforms.Resize(int(round(img_size / 0.875))),
                                      transforms.CenterCrop(img_size), *norm])
        self.train_folder = datasets.ImageFolder(os.path.join(root, "train"), transform=eval_tf)
        test = datasets.ImageFolder(os.path.join(root, split), transform=eval_tf)
        if test.classes != self.train_folder.classes:
            raise ValueError(f"{root}/{split} has classes {test.classes[:5]}..., unlike train/ "
                             f"{self.train_folder.classes[:5]}...")
        self.train_tf = transforms.Compose([transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip(),
                                            *norm])
        self.workers = workers
        super().__init__(len(self.train_folder.classes), len(self.train_folder), self.train_folder, test)

    def loader(self, plan, seed):
        dataset = _KeyedImageFolder(self.train_folder, self.train_tf, seed)
        return iter(torch.utils.data.DataLoader(dataset, batch_sampler=plan, num_workers=self.workers,
                                                pin_memory=torch.cuda.is_available()))


def make_source(data: str, img_size: int, workers: int = 4) -> DataSource:
    """``'digits'`` or an ImageFolder root."""
    if data == "digits":
        return DigitsSource(img_size)
    if not os.path.isdir(data):
        raise ValueError(f"--data must be 'digits' or an existing ImageFolder root, got {data!r}")
    return ImageFolderSource(data, img_size, workers)


def progress(iterable=None, **kwargs):
    """A tqdm bar that refreshes at most every 10 s when stderr is not a terminal (CI logs stay short)."""
    from tqdm import tqdm
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 10.0)
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


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
                                         num_workers=workers)
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
