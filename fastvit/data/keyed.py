"""Counter-based randomness and the global sample stream, so a global batch does not depend on how it is split.

Every sample of a run has a *stream position*: epoch e is a permutation of the training set seeded by (seed, e)
(``GlobalSampler``; shards use ``fastvit.data.shards.ShardSampler``), and the epochs are concatenated. Step s takes
the next ``global_batch`` positions; the augmentation randomness of a sample is a hash of (seed, s, position in the
global batch). Which rank or micro-batch computes a sample therefore changes nothing, so 1 rank x 4 accumulation
steps and 2 ranks x 2 give the same gradients, and a resumed run (which restarts the stream at the saved position)
sees the same batches.
"""
from __future__ import annotations

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


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


MAX_REPLACEMENTS = 16  # unreadable samples in a row before the data counts as broken


def replacement_index(seed: int, step: int, position: int, attempt: int, n: int) -> int:
    """The dataset index that stands in, at its ``attempt``-th try (1, 2, ...), for an unreadable sample at
    (step, position): a hash, so every rank, split and resume picks the same one."""
    return mix_seed(seed, step, position, attempt, 0xBAD) % n
