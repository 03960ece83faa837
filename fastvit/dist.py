"""Process-group setup shared by the trainer and the benchmarks: device and backend choice, and a group that also
survives torchrun's elastic restarts.

Restarts. torchrun's agent (c10d rendezvous, the default) hosts one TCPStore for the whole job and hands every
restart round the same ``MASTER_ADDR:MASTER_PORT``; torch's ``env://`` handler no longer separates rounds in it
(pytorch/pytorch#135712). A restarted worker therefore reads the previous round's keys: gloo connects to the dead
workers' addresses ("connectFullMesh failed ... Connection refused"), or a barrier counts stale arrivals and waits
forever. ``distributed()`` connects to the agent's store itself and prefixes every key with the restart round
(``TORCHELASTIC_RESTART_COUNT``), and gives the store and the group a timeout, so a rank that cannot meet the others
fails (and torchrun restarts the job) instead of hanging. On several nodes each agent counts its own restarts, so
the count names no common round: there ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` makes every round's rank 0 host a
fresh store (tests/test_train_distributed.py runs two agents so), and without it a restarted worker stops with an
error saying so instead of hanging.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


@dataclass
class Env:
    """Where this process runs: its rank and the world size of the process group, and its device."""
    rank: int
    world: int
    device: torch.device


def device_and_backend(device="auto", dist_backend="auto") -> tuple[torch.device, str]:
    """This rank's device (cuda:<LOCAL_RANK> or cpu) and process-group backend (nccl on GPU, gloo on CPU)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    backend = dist_backend if dist_backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"--dist-backend must be 'auto', 'gloo' or 'nccl', got {dist_backend!r}")
    if backend == "nccl" and not use_cuda:
        raise ValueError("--dist-backend nccl needs CUDA; use gloo on CPU")
    return dev, backend


def restart_round() -> int | None:
    """torchrun's restart count of this worker group (0 on the first start), or None outside torchrun."""
    count = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return int(count) if count is not None else None


def elastic_store(timeout: timedelta):
    """A client of torchrun's agent store whose keys are private to this restart round (see the module doc), or
    None when the agent does not host the workers' store (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, other
    launchers): then ``env://`` gives every start a fresh store already."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restart_round() is None:
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0:
        # each node's agent counts its own restarts, so nodes disagree on the round and no prefix can separate
        # rounds; a restarted worker would meet the old round's keys and hang
        fix = ("launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node, so that every restart round "
               "gets a fresh store")
        if restart_round():
            raise RuntimeError(f"torchrun restarted this worker (round {restart_round()}) on one of "
                               f"{os.environ['GROUP_WORLD_SIZE']} nodes that share the agent's store, where the "
                               f"restarted ranks cannot meet: {fix}")
        warnings.warn(f"restarts on more than one node will fail: {fix}", RuntimeWarning, stacklevel=3)
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"fastvit/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/round{restart_round()}", store)


@contextlib.contextmanager
def keep_thread_count():
    """A run sets torch's CPU thread count for its rank (process-wide); give the caller its own back after it."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def distributed(dist_backend="auto", device="auto", timeout_s: float = DEFAULT_TIMEOUT_S):
    """A process group for the run: torchrun's (env://, one store namespace per restart round), or a one-process
    group; torn down only if created here. ``timeout_s`` bounds the wait for the other ranks at start-up and in
    every collective."""
    dev, backend = device_and_backend(device, dist_backend)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    created = not dist.is_initialized()
    if created:
        timeout = timedelta(seconds=timeout_s)
        device_id = dev if use_cuda else None
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            store = elastic_store(timeout)
            if store is None:
                dist.init_process_group(backend, timeout=timeout, device_id=device_id)
            else:
                dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                        world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout,
                                        device_id=device_id)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    try:
        yield Env(dist.get_rank(), dist.get_world_size(), dev)
    except BaseException:
        if created:  # no barrier: the other ranks may be waiting in a collective this rank will never join
            dist.destroy_process_group()
        raise
    if created:
        dist.barrier()  # every rank is done with collectives before the group goes away
        dist.destroy_process_group()


def rank0_print(env: Env, *args):
    if env.rank == 0:
        print(*args, flush=True)
