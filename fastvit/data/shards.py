"""WebDataset tar shards: read by index for training and evaluation, and written from an ImageFolder.

    python -m fastvit.data.shards /data/imagenet /data/imagenet-wds --shard-size 1GB

A shard is a plain tar of samples ``KEY.jpg`` (or ``.png`` / ``.webp``) + ``KEY.cls`` (the class index as text), the
WebDataset layout. Each shard gets an index beside it (``<shard>.idx.json``: per sample its key, the byte offset and
size of the image in the tar, and its label), written by the writer or built by one scan of the tar headers on first
use, so a loader worker reads exactly the bytes of the samples it needs with one seek each.

Order (``ShardSampler``): epoch e visits the shards in a permutation seeded by (seed, e), in windows of ``WINDOW``
consecutive shards whose samples are shuffled together; the stream positions of a global batch then fall in one or
two windows, and every rank reads only its own samples of them. Like ``GlobalSampler`` it depends on the seed and the
shard sizes alone, never on the number of ranks, workers or micro-batches.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import multiprocessing
import os
import re
import sys
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from fastvit.cache import cache_dir
from fastvit.config import plural
from fastvit.data.augment import decode_image, open_pil
from fastvit.data.keyed import mix_seed
from fastvit.data.sources import FileSource, FolderSamples, Samples, progress

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
INDEX_SUFFIX = ".idx.json"
INDEX_VERSION = 2  # 2: a sample whose image a cut went through is dropped; the damage is recorded
MANIFEST = "manifest.json"
WINDOW = 8  # shards shuffled together
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def _webdataset():
    try:
        import webdataset
    except ImportError as e:
        raise ImportError("WebDataset shards need the webdataset package: pip install 'fastvit[shards]'") from e
    return webdataset


def parse_size(text: str) -> int:
    """'1GB' -> 10**9 bytes, '512MiB' -> 512 * 2**20, '4096' -> 4096."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"--shard-size must look like 1GB, 500MB or 1073741824, got {text!r}")
    power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
    size = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
    smallest = _tar_bytes(1)  # one sample: its headers and a block of image data
    if size < smallest:
        raise ValueError(f"--shard-size {text} is {plural(size, 'byte')}, less than one sample takes in a tar "
                         f"({smallest}): every sample would be a shard of its own; give a unit, e.g. 1GB")
    return size


def _split_folders(root: str) -> list:
    return [s for s in ("train", "val", "test") if glob.glob(os.path.join(root, s, "*.tar"))]


def is_shard_spec(data: str) -> bool:
    """Whether ``--data`` names shards: a .tar file or brace pattern, a folder whose train/ holds .tar files, or a
    folder of .tar files (one split, as the writer gives for a SRC without train/)."""
    if os.path.isdir(data):
        return "train" in _split_folders(data) or bool(glob.glob(os.path.join(data, "*.tar")))
    return data.endswith(".tar") or "{" in data


def expand(spec: str) -> list:
    """Shard files of a folder (its .tar files, sorted) or of a brace pattern (``train-{0000..0999}.tar``);
    every name a pattern expands to must exist."""
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not paths:
            splits = _split_folders(spec)  # the writer's DST given where a split folder was meant (--val-data)
            hint = f" (its {' and '.join(s + '/' for s in splits)} do: name that folder)" if splits else ""
            raise ValueError(f"{spec} holds no .tar shards{hint}")
        return paths
    names = _webdataset().shardlists.expand_urls(spec)
    missing = [n for n in names if not os.path.isfile(n)]
    if len(missing) == len(names):
        glob_hint = ("; wildcards (* ? [...]) are not expanded: pass the folder of the shards or a brace pattern "
                     "such as train-{0000..0999}.tar") if any(c in spec for c in "*?[") else ""
        raise ValueError(f"shard pattern {spec!r} matches no file (it expands to {len(names)} name(s), the first "
                         f"{names[0]!r}){glob_hint}")
    if missing:
        raise ValueError(f"shard pattern {spec!r}: {len(missing)} of {len(names)} shards do not exist "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    return names


# ---- index ----------------------------------------------------------------------------------------------------
def scan_shard(path: str) -> dict:
    """Index one shard from its tar headers: {"version", "bytes", "mtime_ns", "probe", "samples": [[key, offset, size,
    label], ...] in tar order, "damage": the warning on a damaged tar or None}. Raises ValueError for a sample
    without a label or an image; a tar damaged part-way is indexed up to the damage, with a warning naming what is
    lost."""
    base_plus_ext = _webdataset().tariterators.base_plus_ext
    entries, order, damage = {}, [], None
    try:
        # a zero-byte file is an empty shard (skipped with a warning, as an empty tar is), not a broken one
        with tarfile.open(path, "r:") if os.path.getsize(path) else contextlib.nullcontext(()) as tar:
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = base_plus_ext(member.name)
                    if key is None:
                        continue
                    if key not in entries:
                        entries[key] = {}
                        order.append(key)
                    ext = ext.lower()
                    if ext == "cls":
                        entries[key]["cls"] = tar.extractfile(member).read()
                    elif ext in IMAGE_EXTS and "image" not in entries[key]:
                        entries[key]["image"] = (member.offset_data, member.size)
                if order:
                    damage = _unterminated(path, tar.offset)
            except (tarfile.ReadError, EOFError, OSError) as e:
                damage = str(e)
    except tarfile.ReadError as e:
        raise ValueError(f"shard {path} is not a readable tar file ({e})") from e
    if damage and order:
        last = entries[order[-1]]
        # the cut went through this sample's members, or its image's data: lost with the rest, never drawn as an
        # unreadable sample (which counts towards --max-bad-frac)
        if "cls" not in last or "image" not in last or sum(last["image"]) > os.path.getsize(path):
            del entries[order.pop()]
    if damage:
        damage = f"shard {path} is damaged after {len(order)} samples ({damage}); the rest of it is lost"
        warnings.warn(damage, RuntimeWarning)
    unlabelled = [k for k in order if "cls" not in entries[k]]
    if unlabelled and len(unlabelled) == len(order):
        raise ValueError(f"shard {path} has no labels: a labelled WebDataset sample is KEY.jpg (or .png/.webp) "
                         f"with KEY.cls holding the class index")
    if unlabelled:
        raise ValueError(f"shard {path}: {len(unlabelled)} of {len(order)} samples have no .cls label "
                         f"(first: {unlabelled[0]!r})")
    imageless = [k for k in order if "image" not in entries[k]]
    if imageless:
        raise ValueError(f"shard {path}: {len(imageless)} samples have no image ({'/'.join(IMAGE_EXTS)}) "
                         f"(first: {imageless[0]!r})")
    samples = []
    for key in order:
        try:
            label = int(entries[key]["cls"].decode().strip())
        except ValueError as e:
            raise ValueError(f"shard {path}: sample {key!r} has a .cls that is not a class index "
                             f"({entries[key]['cls'][:20]!r})") from e
        if not 0 <= label < 2 ** 31:  # an index past int32 is a mistyped .cls (and past int64 would not even store)
            raise ValueError(f"shard {path}: sample {key!r} has class index {label}; class indices are 0 or more "
                             "and below 2**31")
        samples.append([key, *entries[key]["image"], label])
    stat = os.stat(path)
    return {"version": INDEX_VERSION, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "probe": _probe(path, stat.st_size), "samples": samples, "damage": damage}


_PROBE_BYTES = 1 << 16


def _probe(path: str, size: int) -> str:
    """A digest of a shard's first and last 64 KiB. With the size it tells a copy of the indexed shard (cp, rsync,
    gsutil give it another mtime) from a shard written again (the writer's shuffle puts other samples first), so a
    copy keeps its index instead of being scanned again by every run."""
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        digest.update(f.read(_PROBE_BYTES))
        if size > _PROBE_BYTES:
            f.seek(max(_PROBE_BYTES, size - _PROBE_BYTES))
            digest.update(f.read(_PROBE_BYTES))
    return digest.hexdigest()


def _unterminated(path: str, end: int):
    """Why a tar whose members end at byte ``end`` was cut short, or None where a zero block (the end-of-archive
    marker) follows them. Python's tarfile reads a header cut short, or none at all, as the end of the archive, so
    a shard truncated at or inside a header would otherwise lose its last samples without a word."""
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read(tarfile.BLOCKSIZE)
    if len(tail) < tarfile.BLOCKSIZE:
        return f"it ends {len(tail)} bytes after its last whole member, without the tar end-of-archive blocks"
    if any(tail):
        return "a damaged tar header follows its last whole member"
    return None


def write_index(path: str, index: dict) -> None:
    """Write ``index`` to the index file ``path`` (whole or not at all: a reader never sees half of it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(index, f)
    os.replace(tmp, path)


def _index_paths(path: str):
    """Where a shard's index may be, in order: beside it, else (a read-only dataset) in fastvit's cache folder
    (:func:`fastvit.cache.cache_dir`: ``$FASTVIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastvit``, ``~/.cache/fastvit``)
    under a name of the shard's real path, so that no run scans a read-only shard more than once per machine. A
    generator: the cache's name is worked out only where the index beside the shard does not serve."""
    yield path + INDEX_SUFFIX
    real = os.path.realpath(path)
    name = f"{os.path.basename(real)}-{hashlib.blake2b(real.encode(), digest_size=8).hexdigest()}{INDEX_SUFFIX}"
    yield str(cache_dir() / "shard-index" / name)


def _save_index(path: str, index: dict) -> None:
    """Save a shard's index where :func:`_index_paths` first can; kept in memory only where neither can be written."""
    for where in _index_paths(path):
        try:
            os.makedirs(os.path.dirname(where), exist_ok=True)
            write_index(where, index)
            return
        except OSError:
            continue


def _valid_index(path: str, where: str, stat) -> dict | None:
    """The index in file ``where`` where it matches the shard: the same size and time, or the same size and
    :func:`_probe` (a copy; the index then takes the copy's time)."""
    try:
        with open(where) as f:
            index = json.load(f)
        if index.get("version") != INDEX_VERSION or index["bytes"] != stat.st_size:
            return None
        copied = index["mtime_ns"] != stat.st_mtime_ns
        if copied and index.get("probe") != _probe(path, stat.st_size):
            return None
    except (OSError, ValueError, KeyError):
        return None
    if copied:
        index["mtime_ns"] = stat.st_mtime_ns
        with contextlib.suppress(OSError):
            write_index(where, index)
    return index


def shard_index(path: str) -> dict:
    """The shard's index: a saved one that matches the shard (:func:`_valid_index`; beside the shard or in the
    cache, :func:`_index_paths`), else a fresh scan, saved (:func:`_save_index`)."""
    stat = os.stat(path)
    for where in _index_paths(path):
        index = _valid_index(path, where, stat)
        if index is not None:
            if index["damage"]:  # said again by every run that reads the shard, not only by the scanning one
                warnings.warn(index["damage"], RuntimeWarning)
            return index
    index = scan_shard(path)
    _save_index(path, index)
    return index


class ShardSamples(Samples):
    """The samples of a list of shards, in shard order, read by (offset, size) from the index."""

    def __init__(self, paths: list, desc: str = "index shards"):
        indexes = [shard_index(p) for p in progress(paths, desc=desc, leave=False, disable=len(paths) < 50)]
        empty = [p for p, ix in zip(paths, indexes) if not ix["samples"]]
        for p in empty:
            warnings.warn(f"shard {p} holds no samples; skipped", RuntimeWarning)
        kept = [(p, ix) for p, ix in zip(paths, indexes) if ix["samples"]]
        if not kept:
            raise ValueError(f"the shards hold no samples ({len(paths)} shard(s), first {paths[0]})")
        self.paths = [p for p, _ in kept]
        self.counts = np.array([len(ix["samples"]) for _, ix in kept], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        columns = [np.array([s[1:] for s in ix["samples"]], dtype=np.int64) for _, ix in kept]
        self.offsets, self.sizes, self.labels = np.concatenate(columns).T.copy()
        self._files, self._pid, self._keys = {}, None, {}

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, sample number in the shard) of a global sample index."""
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, int(index - self.starts[shard])

    def _file(self, shard):
        if self._pid != os.getpid():  # a forked loader worker opens its own handles
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            if len(self._files) >= 2 * WINDOW:
                self._files.pop(next(iter(self._files))).close()
            self._files[shard] = open(self.paths[shard], "rb")
        return self._files[shard]

    def read(self, index):
        f = self._file(self.locate(index)[0])
        f.seek(int(self.offsets[index]))
        data = f.read(int(self.sizes[index]))
        if len(data) != self.sizes[index]:
            raise OSError(f"shard truncated: {len(data)} of {self.sizes[index]} bytes")
        return data

    def name(self, index):
        shard, i = self.locate(index)
        if shard not in self._keys:  # keys are kept only for shards with a named sample (a shard index each)
            self._keys[shard] = [sample[0] for sample in shard_index(self.paths[shard])["samples"]]
        return f"{self.paths[shard]}:{self._keys[shard][i]}"

    def sampler(self, seed):
        return ShardSampler(self.counts, seed)

    def _identity(self):
        # shard names (not folders: moved shards are the same data) and every sample's size in bytes
        names = "\n".join(os.path.basename(p) for p in self.paths).encode(errors="surrogateescape")
        return names + self.sizes.tobytes()

    def __getstate__(self):  # open files stay in the process that opened them
        return {**self.__dict__, "_files": {}, "_pid": None}


class ShardSampler:
    """Stream position -> sample index: each epoch a seeded shard order, shuffled within windows of shards."""

    def __init__(self, counts, seed: int, window: int = WINDOW):
        self.counts, self.seed, self.window = np.asarray(counts, dtype=np.int64), seed, window
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.n = int(self.starts[-1])
        self._epochs, self._windows = {}, {}

    def _epoch(self, epoch):
        """(shard order, start position of each window) of an epoch."""
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0x5AD, epoch))
            order = torch.randperm(len(self.counts), generator=g).numpy()
            sizes = [self.counts[order[i:i + self.window]].sum() for i in range(0, len(order), self.window)]
            self._epochs[epoch] = order, np.concatenate([[0], np.cumsum(sizes)])
        return self._epochs[epoch]

    def _members(self, epoch, w):
        """The sample indices of window ``w`` of an epoch, shuffled."""
        if (epoch, w) not in self._windows:
            if len(self._windows) > 2:
                self._windows.pop(min(self._windows))
            order, _ = self._epoch(epoch)
            shards = order[w * self.window:(w + 1) * self.window]
            members = np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in shards])
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0x5AD, epoch, w))
            self._windows[(epoch, w)] = members[torch.randperm(len(members), generator=g).numpy()]
        return self._windows[(epoch, w)]

    def index(self, position: int) -> int:
        epoch, p = divmod(position, self.n)
        _, window_starts = self._epoch(epoch)
        w = int(np.searchsorted(window_starts, p, side="right")) - 1
        return int(self._members(epoch, w)[p - window_starts[w]])


def resolve_specs(data: str, val_data: str | None) -> tuple[str, str]:
    """(train spec, held-out spec) from --data and --val-data."""
    splits = _split_folders(data) if os.path.isdir(data) else []
    if splits:
        held_out = next((s for s in ("val", "test") if s in splits), None)
        if "train" not in splits or held_out is None:
            raise ValueError(f"--data {data!r}: a shard folder needs train/ and val/ (or test/) sub-folders of .tar "
                             f"shards (found .tar files in: {', '.join(splits) or 'none'})")
        return os.path.join(data, "train"), val_data or os.path.join(data, held_out)
    if val_data is None:
        kind = "folder of shards without train/ and val/" if os.path.isdir(data) else "shard pattern"
        raise ValueError(f"--data {data!r} is a {kind}: pass the held-out shards with --val-data (a pattern or a "
                         "folder of .tar files)")
    return data, val_data


def shard_files(data: str, val_data: str | None) -> tuple | None:
    """(training shards, held-out shards) that --data and --val-data name, as real paths, or None where they name
    no shards: the same shards named as a folder or as a brace pattern are the same data."""
    if data == "digits" or not is_shard_spec(data):
        return None
    try:
        return tuple(tuple(os.path.realpath(p) for p in expand(spec)) for spec in resolve_specs(data, val_data))
    except (ValueError, ImportError):
        return None


def manifest_classes(shard_path: str) -> list | None:
    """The class names of the manifest this module's writer put above a split's shards (DST/manifest.json for
    DST/train/*.tar), or None for shards written by another tool."""
    split_folder = os.path.dirname(os.path.abspath(shard_path))
    for folder in (os.path.dirname(split_folder), split_folder):
        try:
            with open(os.path.join(folder, MANIFEST)) as f:
                return json.load(f)["classes"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def count_classes(train: "ShardSamples", test: "ShardSamples") -> int:
    """The number of classes: that of the manifest above the shards, every label checked against it; else the
    largest label + 1 (WebDataset shards carry no class list), with a warning when an index below it has no
    training sample, which is how a mistyped .cls shows (a 7 among 3 classes would build an 8-way head)."""
    classes = manifest_classes(train.paths[0])
    held_out = manifest_classes(test.paths[0])
    if classes is not None and held_out is not None and held_out != classes:
        # each writer run numbers the classes it found: an index would name another class in each split
        first = next(i for i, pair in enumerate(zip(classes, held_out + [None] * len(classes))) if pair[0] != pair[1])
        raise ValueError(f"the held-out shards' {MANIFEST} lists other classes than the training shards' (index "
                         f"{first}: {held_out[first] if first < len(held_out) else 'none'!r} there, {classes[first]!r} "
                         f"in training; {len(held_out)} vs {len(classes)} classes): write both splits in one run of "
                         "python -m fastvit.data.shards, from a SRC with train/ and val/")
    if classes is not None:
        for split, samples in (("training", train), ("held-out", test)):
            wrong = np.flatnonzero(samples.labels >= len(classes))
            if len(wrong):
                raise ValueError(f"{split} sample {samples.name(int(wrong[0]))} has class index "
                                 f"{samples.labels[wrong[0]]}, but the shards' {MANIFEST} lists {len(classes)} "
                                 f"classes ({len(wrong)} such sample(s))")
        return len(classes)
    count = int(max(train.labels.max(), test.labels.max())) + 1
    distinct = len(np.unique(np.concatenate([train.labels, test.labels])))
    # A mistyped .cls (a stray digit, a hash) puts the count far above the classes the shards show, up to a head
    # that cannot be allocated. Shards show most of their classes (ImageNet-21k all 21841; a subset run misses
    # some), so only a count over 10x the distinct labels, and over 1000 more than them, is refused.
    if count > 10 * distinct and count - distinct > 1000:
        split, samples = ("training", train) if train.labels.max() + 1 == count else ("held-out", test)
        raise ValueError(f"{split} sample {samples.name(int(np.argmax(samples.labels)))} has class index "
                         f"{count - 1}, but the shards hold only {distinct} distinct class indices: a mistyped .cls? "
                         f"Without a {MANIFEST} listing the classes above the shards, the head has the largest .cls "
                         f"+ 1 classes; fix the .cls, or list the {count} classes in a {MANIFEST} if there are so many")
    trained = np.unique(train.labels)
    if len(trained) < count:
        gaps = np.flatnonzero(trained != np.arange(len(trained)))
        warnings.warn(f"{count - len(trained)} of the class indices 0..{count - 1} have no training sample (the first: "
                      f"{gaps[0] if len(gaps) else len(trained)}); the head has {count} classes, the largest .cls + "
                      f"1. Without a {MANIFEST} listing the classes above the shards, a mistyped .cls makes the head "
                      "bigger", RuntimeWarning)
    return count


class ShardSource(FileSource):
    """Training and held-out images from WebDataset shards."""

    def __init__(self, data: str, val_data: str | None, img_size: int, workers: int = 4, decode: str = "cpu",
                 device=None):
        train_spec, val_spec = resolve_specs(data, val_data)
        train = ShardSamples(expand(train_spec), desc="index train shards")
        test = ShardSamples(expand(val_spec), desc="index val shards")
        super().__init__(train, test, img_size, workers, decode, device, count_classes(train, test))


# ---- writer ---------------------------------------------------------------------------------------------------
def _encoded(path: str) -> tuple[str, bytes]:
    """(extension, bytes) to store for an image file: JPEG, PNG and WebP as they are, other formats as PNG."""
    ext = Path(path).suffix.lower().lstrip(".")
    data = Path(path).read_bytes()
    if ext in IMAGE_EXTS:
        return ("jpg" if ext == "jpeg" else ext), data
    import io
    out = io.BytesIO()
    with open_pil(data) as image:
        image.save(out, format="PNG")
    return "png", out.getvalue()


def _read_splits(plan) -> list:
    """The FolderSamples of every split, their class lists compared before anything is written (a class index must
    name the same class in every split; found after train/ was written, its shards stayed without a manifest)."""
    splits = [FolderSamples(src) for src, _, _ in plan]
    classes = splits[0].classes
    for (src, _, _), samples in zip(plan, splits):
        if samples.classes != classes:
            lacks = [c for c in classes if c not in samples.classes]
            extra = [c for c in samples.classes if c not in classes]
            differences = [f"{what} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" for what, names in
                           ((f"lacks {len(lacks)} of them", lacks), (f"has {len(extra)} other(s)", extra)) if names]
            raise ValueError(f"{src} must have the {len(classes)} classes of {plan[0][0]} (a class index names the "
                             f"same class in every split), but {' and '.join(differences)}")
    return splits


def _ignored(root: str, samples: FolderSamples) -> dict:
    """The files under an ImageFolder split that it does not list (another extension, or outside the class folders),
    counted per extension: left out of the shards, they would otherwise go unnoticed."""
    listed = set(samples.paths)
    ignored = Counter(Path(name).suffix.lower() or "(none)" for folder, _, names in os.walk(root, followlinks=True)
                      for name in names if os.path.join(folder, name) not in listed)
    return {"count": ignored.total(), "extensions": dict(sorted(ignored.items(), key=lambda item: (-item[1], item[0])))}


def _tar_bytes(data_size: int) -> int:
    """Bytes a sample takes in a tar: a header and the data padded to 512-byte blocks, for the image and the .cls."""
    return 3 * tarfile.BLOCKSIZE + -(-data_size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def write_split(samples: FolderSamples, dst: str, prefix: str, shard_size: int, seed: int) -> dict:
    """Write an ImageFolder's samples as shards ``dst/<prefix>-NNNNNN.tar`` into the folder ``dst`` (samples in a
    seeded random order, so every shard mixes classes; each shard at most ``shard_size`` bytes of tar members, or
    one sample) with their indexes; returns the split's manifest entry."""
    wds = _webdataset()
    order = np.random.default_rng(seed).permutation(len(samples))
    shards, sources, skipped, per_class = [], {}, [], Counter()
    writer, tmp, size = None, None, 0

    def close():
        writer.close()
        final = tmp[:-len(".tmp")]
        os.replace(tmp, final)
        index = scan_shard(final)
        write_index(final + INDEX_SUFFIX, index)
        per_class.update(samples.classes[s[3]] for s in index["samples"])
        # per shard no class counts: at ImageNet-21k's 21,841 classes and 2,000 shards they made a manifest of
        # hundreds of MB, read by every rank at start (each shard's index holds its labels)
        shards.append({"name": os.path.basename(final), "samples": len(index["samples"]), "bytes": index["bytes"]})

    for n, i in enumerate(progress(order, desc=f"write {prefix}", unit="img")):
        try:
            ext, data = _encoded(samples.paths[i])
        except Exception as e:  # noqa: BLE001  an unreadable source of a format we re-encode
            skipped.append({"source": samples.paths[i], "error": f"{type(e).__name__}: {e}"})
            continue
        if writer is None or (size + _tar_bytes(len(data)) > shard_size and size > 0):
            if writer is not None:
                close()
            tmp = os.path.join(dst, f"{prefix}-{len(shards):06d}.tar.tmp")
            writer, size = wds.TarWriter(tmp, encoder=False, mtime=0), 0
        key = f"{n:09d}"
        sources[f"{prefix}-{len(shards):06d}.tar:{key}"] = samples.paths[i]
        writer.write({"__key__": key, ext: data, "cls": str(int(samples.labels[i])).encode()})
        size += _tar_bytes(len(data))
    if writer is not None:
        close()
    return {"samples": sum(s["samples"] for s in shards), "per_class": dict(sorted(per_class.items())),
            "shards": shards, "skipped": skipped, "_sources": sources}


def _decode_check(item):
    path, offset, size = item
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    try:
        decode_image(data)
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def verify(folder: str, workers: int = 0) -> tuple[list, int]:
    """Decode every sample of the shards in ``folder`` as training does (``decode_image``); returns ([(shard:key,
    error)] of those that fail, the number of samples)."""
    paths = expand(folder)
    items, names = [], []
    for path in paths:
        for key, offset, size, _ in shard_index(path)["samples"]:
            items.append((path, offset, size))
            names.append(f"{os.path.basename(path)}:{key}")
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 0 else None
    try:
        results = pool.imap(_decode_check, items, chunksize=64) if pool else map(_decode_check, items)
        bar = progress(results, total=len(items), desc=f"verify {os.path.basename(folder)}", unit="img")
        failed = [(name, err) for err, name in zip(bar, names) if err]  # the bar first: it ends, and closes
    except BaseException:  # Ctrl-C: the workers are interrupted too, and a join would wait for them
        if pool:
            pool.terminate()
        raise
    finally:
        if pool:
            pool.close()
            pool.join()
    return failed, len(items)


# what a write leaves in a folder: shards, their indexes (and an index being written), unfinished shards
_WRITTEN = ("*.tar", "*.tar" + INDEX_SUFFIX, "*.tar" + INDEX_SUFFIX + ".*.tmp", "*.tar.tmp")


def _clear_earlier_write(dst, overwrite):
    """Shards in DST or its train/ val/ test/ folders (an earlier write's, or others') would be read with the new
    ones, a folder being all its .tar files, and a held-out split the new write has not would be read instead of
    its own: removed with ``overwrite`` (with their indexes, unfinished shards and the manifest), else an error."""
    folders = [dst] + [os.path.join(dst, split) for split in ("train", "val", "test")]
    old = [path for folder in folders for pattern in _WRITTEN
           for path in sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))]
    old += [path for path in [os.path.join(dst, MANIFEST)] if os.path.exists(path)]
    if old and not overwrite:
        shards = [p for p in old if p.endswith((".tar", ".tar.tmp"))] or old
        raise ValueError(f"DST {dst!r} already holds {len(shards)} shard(s) or file(s) of an earlier write "
                         f"({shards[0]}, ...), which a reader of the folder would take with the new ones; pass "
                         f"--overwrite to remove them (every .tar, its index, unfinished .tar.tmp files and "
                         f"{MANIFEST}, in DST and its train/ val/ test/ folders), or choose an empty DST")
    for path in old:
        os.remove(path)


def _check_apart(src: str, dst: str) -> None:
    """SRC and DST must be apart: shards written into SRC land beside its class folders (and ``--data SRC`` is then
    read as shards), and images inside DST share a tree with the shards made from them."""
    if not os.path.isdir(src):
        raise ValueError(f"SRC {src!r} is not a folder")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"DST {dst!r} is a file; DST is the folder the shards are written to")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    common = os.path.commonpath([real_src, real_dst])
    if common in (real_src, real_dst):
        overlap = (f"DST {dst!r} is SRC {src!r}" if real_src == real_dst else
                   f"DST {dst!r} lies inside SRC {src!r}" if common == real_src else
                   f"SRC {src!r} lies inside DST {dst!r}")
        raise ValueError(f"{overlap}: the shards would share a folder tree with the images they are made from; "
                         f"choose a DST apart from SRC, neither inside the other")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastvit.data.shards", description=(
        "Write an ImageFolder (SRC/train and SRC/val or SRC/test, or SRC itself as one split) as WebDataset tar "
        "shards with indexes and a manifest (counts per class and per shard), then decode every sample to verify. "
        "With --verify DST, only verify shards written before."))
    parser.add_argument("src", nargs="?", help="ImageFolder root: train/ and val/ (or test/) class folders, or class "
                                               "folders")
    parser.add_argument("dst", nargs="?", help="output folder (train/ and val/ sub-folders of shards, manifest.json)")
    parser.add_argument("--shard-size", default="1GB",
                        help="bytes per shard, tar headers included (1GB, 500MB, 64MiB, ...; default: 1GB)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order (shards mix classes)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes for the verify pass (0: in this process)")
    parser.add_argument("--no-verify", action="store_true", help="skip decoding every sample after writing")
    parser.add_argument("--verify", metavar="DST",
                        help="decode every sample of shards already written (a writer's DST, or a folder of .tar "
                             "files) and record the result in its manifest.json; takes no SRC")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove the shards (and manifest) an earlier write, or another tool, left in DST")
    return parser


def _write(args, shard_size: int):
    """Write every split of SRC into DST; returns (manifest without the verify pass, [(split folder, split name)],
    {split/shard:key: source path})."""
    _check_apart(args.src, args.dst)
    splits = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(args.src, s))]
    if splits and "train" not in splits:
        raise ValueError(f"SRC {args.src!r} has {splits} but no train/ folder")
    src = os.path.abspath(args.src)
    plan = [(os.path.join(src, s), os.path.join(args.dst, s), s) for s in splits] or [(src, args.dst, "shard")]
    folders = _read_splits(plan)
    _clear_earlier_write(args.dst, args.overwrite)
    for _, dst, _ in plan:
        try:
            os.makedirs(dst, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create {dst!r} for DST {args.dst!r}: {e.strerror}") from e
    manifest = {"source": src, "shard_size": shard_size, "seed": args.seed, "splits": {}}
    sources = {}
    for (split_src, dst, name), samples in zip(plan, folders):
        entry = write_split(samples, dst, name, shard_size, args.seed)
        entry["ignored"] = _ignored(split_src, samples)
        for key, path in entry.pop("_sources").items():
            sources[f"{name}/{key}"] = path
        manifest["splits"][name] = entry
    manifest["classes"] = folders[0].classes
    return manifest, [(dst, name) for _, dst, name in plan], sources


def _written_splits(dst: str) -> list:
    """[(split folder, split name)] of shards written before: DST's train/ val/ test/, or DST's own .tar files."""
    splits = [(os.path.join(dst, s), s) for s in _split_folders(dst)]
    if not splits and glob.glob(os.path.join(glob.escape(dst), "*.tar")):
        splits = [(dst, "shard")]
    if not splits:
        raise ValueError(f"--verify {dst!r}: no .tar shards there, nor in its train/ val/ test/ folders")
    return splits


def _verify_all(splits, sources, workers) -> dict:
    """The manifest's ``verify`` entry: every sample of every split decoded as training decodes it."""
    failed, total = [], 0
    for folder, name in splits:
        errors, count = verify(folder, workers)
        failed += [{"sample": f"{name}/{key}", "source": sources.get(f"{name}/{key}"), "error": err}
                   for key, err in errors]
        total += count
    return {"decoded": total - len(failed), "undecodable": failed}


def _report_write(manifest) -> bool:
    """Print what was written, ignored and not written; whether a source was not written."""
    ignored = Counter()
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['samples']} samples in {len(entry['shards'])} shards, "
              f"{len(entry['per_class'])} classes")
        ignored.update(entry["ignored"]["extensions"])
    if ignored:
        counts = ", ".join(f"{ext} {n}" for ext, n in ignored.most_common())
        print(f"ignored {ignored.total()} file(s) in SRC, not written ({counts}): ImageFolder reads only "
              f"{', '.join(IMG_EXTENSIONS)} files inside class folders", file=sys.stderr)
    skipped = [s for entry in manifest["splits"].values() for s in entry["skipped"]]
    for item in skipped:
        print(f"not written (unreadable source): {item['source']} ({item['error']})", file=sys.stderr)
    return bool(skipped)


def _report_verify(result) -> bool:
    """Print every undecodable sample and the count that decode; whether a sample does not decode."""
    failed = result["undecodable"]
    for item in failed:
        source = f" from {item['source']}" if item["source"] else ""
        print(f"undecodable: {item['sample']}{source} ({item['error']})", file=sys.stderr)
    if failed:
        print(f"{len(failed)} sample(s) do not decode; training replaces them (counted against --max-bad-frac)",
              file=sys.stderr)
    print(f"verified: {result['decoded']} sample(s) decode")
    return bool(failed)


def main(argv=None) -> int:
    """Write, then verify (or with --verify only verify); 1 when a source was not written or a sample does not
    decode. Every path of a source in manifest.json (``source``, ``skipped``, ``verify.undecodable``) is absolute.
    The manifest is written before the verify pass, so an interrupted verify loses no write."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verify is not None:
        if args.src is not None or args.no_verify or args.overwrite:
            parser.error("--verify DST takes no SRC, DST, --no-verify or --overwrite: it reads shards written before")
    elif args.dst is None:
        parser.error("SRC and DST are required (or --verify DST to verify shards written before)")
    dst = args.verify if args.verify is not None else args.dst
    manifest_path = Path(dst, MANIFEST)
    try:
        if args.verify is not None:
            splits, sources = _written_splits(dst), {}
            try:
                manifest = json.loads(manifest_path.read_text())
            except (OSError, ValueError):
                manifest = None  # shards of another tool: the result is printed only
        else:
            manifest, splits, sources = _write(args, parse_size(args.shard_size))
            manifest["verify"] = None  # not verified (yet)
            manifest_path.write_text(json.dumps(manifest, indent=1))
    except (ValueError, ImportError) as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        print(f"interrupted while writing: DST {dst!r} holds a part of the shards and no {MANIFEST}; rerun with "
              f"--overwrite", file=sys.stderr)
        return 130
    problems = args.verify is None and _report_write(manifest)
    if args.verify is not None or not args.no_verify:
        try:
            result = _verify_all(splits, sources, args.workers)
        except KeyboardInterrupt:
            print(f"interrupted while verifying: the shards{' and ' + MANIFEST if manifest else ''} are written, "
                  f"unverified; python -m fastvit.data.shards --verify {dst} verifies them", file=sys.stderr)
            return 130
        if manifest is not None:
            manifest["verify"] = result
            manifest_path.write_text(json.dumps(manifest, indent=1))
        problems = _report_verify(result) or problems
    if manifest is not None:
        print(f"wrote {manifest_path}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
