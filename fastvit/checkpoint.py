"""Step checkpoints with torch.distributed.checkpoint (DCP): written under a temporary name, renamed when complete.

Layout: ``<out>/checkpoints/step_00000042/`` holds DCP shards (``__<rank>_0.distcp``), DCP's ``.metadata`` and
``config.json`` (the run's configuration, so a checkpoint can rebuild its model). Every rank writes its shards into
``step_00000042.tmp``; after a barrier rank 0 renames the folder, so a folder without ``.tmp`` is complete. A run killed
mid-save leaves only a ``.tmp`` folder, which ``--resume auto`` skips with a warning, as it skips folders whose
metadata is missing or unreadable (and, in the trainer, ones whose shards fail to load). A save that fails (a full
disk) deletes its ``.tmp`` folder and raises ``CheckpointWriteError`` naming the checkpoint that stays usable.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
_STEP_RE = re.compile(r"^step_(\d+)(\.tmp)?$")


class CheckpointWarning(UserWarning):
    """A checkpoint folder that resume skips (incomplete or corrupt), or one that could not be written."""


class IncompatibleCheckpointError(ValueError):
    """A complete checkpoint without entries the state it is loaded into needs (another optimizer or other parameter
    groups): an error, never skipped as a damaged checkpoint is, which would start the run afresh over it."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the earlier checkpoints are untouched."""


def checkpoint_dir(out) -> Path:
    return Path(out) / CHECKPOINT_DIR


def step_path(out, step: int) -> Path:
    return checkpoint_dir(out) / f"step_{step:08d}"


def checkpoint_step(path) -> int:
    """The step number in a checkpoint folder's name."""
    m = _STEP_RE.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like step_00000042)")
    return int(m.group(1))


def check_complete(path) -> None:
    """Raise ValueError saying why ``path`` is not a complete, readable checkpoint."""
    path = Path(path)
    if path.name.endswith(".tmp"):
        raise ValueError("incomplete (the run stopped while writing it)")
    if not (path / ".metadata").is_file():
        raise ValueError("no .metadata file (incomplete)")
    try:
        keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # a truncated or garbled pickle raises anything from EOFError to UnpicklingError
        raise ValueError(f"unreadable metadata ({type(e).__name__}: {e})") from e
    if "trainer.step" not in keys:
        raise ValueError("not a fastvit training checkpoint (no trainer.step)")


def saved_keys(path) -> set:
    """Flattened state-dict keys stored in a checkpoint (e.g. 'model.head.weight', 'rng/rank0')."""
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def resume_candidates(out, warn: bool = True) -> list:
    """Complete checkpoints in ``out``, newest first; incomplete or unreadable ones are skipped with a warning."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if not (path.is_dir() and _STEP_RE.match(path.name)):
            continue
        try:
            check_complete(path)
        except ValueError as e:
            if warn:
                warnings.warn(f"skipping checkpoint {path}: {e}", CheckpointWarning, stacklevel=2)
            continue
        found.append((checkpoint_step(path), path))
    return [p for _, p in sorted(found, reverse=True)]


def find_checkpoint(path) -> Path | None:
    """A training checkpoint folder: ``path`` itself, or the latest complete one in a run folder ``path``."""
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():
        check_complete(path)
        return path
    if path.is_dir():
        found = resume_candidates(path)
        if not found:
            seeds = sorted(p.name for p in path.glob("seed_*") if p.is_dir())
            hint = f" (a --seeds run: pass one of its folders, {', '.join(seeds[:3])}, ...)" if seeds else ""
            if path.name == CHECKPOINT_DIR and resume_candidates(path.parent, warn=False):
                # the step folders are in it, not in a checkpoints/ below it: "holds none" would be untrue
                hint = (f" (it is the {CHECKPOINT_DIR}/ folder of run {path.parent}: pass the run folder, or one of "
                        f"the step folders in it)")
            raise ValueError(f"{path} holds no complete training checkpoint{hint}")
        return found[0]
    return None


def write_config(folder, config: dict) -> None:
    """Store a run's configuration as ``config.json`` in ``folder`` (a run folder or a checkpoint)."""
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))


def read_config(path) -> dict:
    """The run configuration stored beside a checkpoint."""
    return json.loads((Path(path) / CONFIG_FILE).read_text())


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group; one process is a supported use here (tools, tests)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def failure_reason(e: BaseException) -> str:
    """One line on why a save or load failed; DCP wraps each rank's exception in a CheckpointException."""
    where = ""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (e, _) = next(iter(e.failures.items()))
        where = f"rank {rank}: "
    text = str(e).strip() or ("a file ends early (truncated or corrupt)" if isinstance(e, EOFError) else "no message")
    return f"{where}{type(e).__name__}: {text}".splitlines()[0]


def _agree(error: BaseException | None) -> str | None:
    """Collective: the first rank's failure reason, or None when every rank succeeded (ranks act alike after)."""
    reason = None if error is None else failure_reason(error)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return reason
    reasons = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r is not None), None)


def save(out, step: int, state: dict, config: dict, keep: int = 0) -> Path:
    """Collective: write ``state`` with DCP as ``step_<step>`` in ``out``, then keep only the newest ``keep``
    complete checkpoints (0 keeps all). Returns the final folder. A write that fails on any rank (a full disk)
    removes the partial folder and raises CheckpointWriteError on every rank; older checkpoints are untouched."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = step_path(out, step)
    tmp = final.with_name(final.name + ".tmp")
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    reason = _agree(error)  # also the barrier before any rank writes into tmp
    if reason is None:
        try:
            with _single_process_quiet():
                dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
            if rank == 0:
                write_config(tmp, config)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            error = e
        reason = _agree(error)  # every rank's shards are on disk before the folder counts as complete
    if reason is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        previous = resume_candidates(out, warn=False)
        raise CheckpointWriteError(f"checkpoint {final} could not be written ({reason}{free_space_note(out)}); "
                                   + (f"{previous[0]} stays the newest usable checkpoint" if previous else
                                      "there is no earlier checkpoint"))
    if rank == 0:
        if final.exists():  # an older, unusable checkpoint of the same step (the run resumed before it)
            shutil.rmtree(final)
        tmp.rename(final)
        if keep > 0:
            prune(out, keep)
    _barrier()
    return final


def free_space_note(folder) -> str:
    """'; 12 KiB free on its disk' where the disk holding ``folder`` has under 64 MiB left, else '': the error a
    full disk gives inside torch's writer ('unexpected pos 704 vs 598') does not say so."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    if free >= 64 << 20:
        return ""
    return f"; {free >> 10} KiB free on its disk"


def prune(out, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints and delete every step folder older than the oldest of them,
    complete or not: an unreadable one there can no longer be the newest usable, and would stay on disk forever.
    Broken folders newer than that stay for a look (resume skips them with a warning)."""
    kept = resume_candidates(out, warn=False)[:keep]
    if len(kept) < keep:
        return
    oldest = checkpoint_step(kept[-1])
    for path in checkpoint_dir(out).iterdir():
        if path.is_dir() and _STEP_RE.match(path.name) and checkpoint_step(path) < oldest:
            shutil.rmtree(path, ignore_errors=True)


def load(path, state: dict) -> None:
    """Collective: fill ``state`` (a dict of the same structure as the saved one, or a subset) in place; raises
    ``IncompatibleCheckpointError`` naming what ``state`` needs that the checkpoint lacks."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    saved = saved_keys(path)
    missing = sorted(k for k in flatten_state_dict(state)[0] if k not in saved)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise IncompatibleCheckpointError(f"it lacks {missing[0]!r}{more}")
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())


def remove_incomplete(out) -> None:
    """Delete ``.tmp`` folders left by runs killed while saving (call on one rank)."""
    root = checkpoint_dir(out)
    if root.is_dir():
        for path in root.glob("step_*.tmp"):
            shutil.rmtree(path, ignore_errors=True)


def read_tensors(path) -> dict:
    """Every tensor of a step folder, keyed by its dotted path ('model.head.weight',
    'optim.state.head.weight.exp_avg'), read in one process: for inspecting or comparing checkpoints."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "state.pt"
        dcp_to_torch_save(path, target)
        state = torch.load(target, weights_only=False)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", state)
    return flat
