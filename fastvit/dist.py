"""Process-group setup shared by the trainer and the benchmarks: device and backend choice, and a group that also
survives torchrun's elastic restarts.

Restarts. torchrun's agents (c10d rendezvous, the default) host one TCPStore for the whole job and hand every restart
round the same ``MASTER_ADDR:MASTER_PORT``; torch's ``env://`` handler no longer separates rounds in it
(pytorch/pytorch#135712). A restarted worker would read the killed round's keys: gloo connects to the dead workers'
addresses ("connectFullMesh failed ... Connection refused"), or a barrier counts stale arrivals and waits forever.
No round number separates them either: each node's agent counts its own restarts (the node whose worker died counts
one, the others restart theirs without counting). So ``distributed()`` gives each start of the job a store of its
own (:func:`round_store`): global rank 0 hosts a fresh TCPStore and announces its address in the agent's store; the
other ranks take the announced store once they can reach it and it answers with the announcement's token (a stale
announcement names a store that died with the previous round's rank 0). The store and the group get a timeout, so a
rank that cannot meet the others fails (and torchrun restarts the job) instead of hanging. Tested: one agent of two
workers and two agents ("nodes") of one, each with three SIGKILLs (tests/test_train_distributed.py).
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import time
import uuid
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


def _advertised_host() -> str:
    """The address other ranks reach this host's store by: the local address of the interface that routes to the
    agent's store (``MASTER_ADDR``), or ``MASTER_ADDR`` itself where that route is loopback (this host is the
    store's host, and a name that resolves to loopback here, as Debian's hosts file does, resolves to a reachable
    address on the other nodes, which reach the agent's store by it)."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as s:
        s.connect(address)  # UDP: picks the route and the local address, sends nothing
        local = s.getsockname()[0]
    return host if ipaddress.ip_address(local.split("%")[0]).is_loopback else local


def round_store(agent_store, rank: int, world: int, timeout: timedelta, key: str = "fastvit/round_store",
                probe_s: float = 2.0):
    """A store private to this start of the job (see the module doc), met through ``agent_store`` under ``key``.

    Rank 0 starts a TCPStore server and sets ``key`` to its host, port and a fresh token; every other rank reads
    ``key``, connects within ``probe_s`` and checks the token, and otherwise (the previous round's announcement,
    whose store is gone, or a store slow to answer) reads ``key`` again, until ``timeout``."""
    if rank == 0:
        store = dist.TCPStore(_advertised_host(), 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        token = uuid.uuid4().hex
        store.set("fastvit/token", token)
        agent_store.set(key, json.dumps([store.host, store.port, token]))
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        host, port, token = json.loads(agent_store.get(key))  # waits for the first round's announcement
        probe = timedelta(seconds=max(0.1, min(probe_s, deadline - time.monotonic())))
        try:
            # a plain socket first: a TCPStore client logs a C++ error with its stack for every failed try, about
            # 20 lines at each restart for the killed round's announcement, which read like a real failure
            if _listening(host, port, probe.total_seconds()):
                store = dist.TCPStore(host, port, world, is_master=False, timeout=probe)
                if store.get("fastvit/token").decode() == token:
                    store.set_timeout(timeout)
                    return store
        except (RuntimeError, OSError):  # refused, timed out, or not a store: a stale or late announcement
            pass
        if time.monotonic() >= deadline:
            raise RuntimeError(f"rank {rank} found no store of this restart round announced by rank 0 within "
                               f"{timeout.total_seconds():.0f} s (last announcement {host}:{port}); --dist-timeout "
                               f"bounds this wait")
        time.sleep(0.2)


def _listening(host: str, port: int, seconds: float) -> bool:
    """Whether anything accepts a TCP connection at host:port within ``seconds``."""
    try:
        with socket.create_connection((host, port), timeout=seconds):
            return True
    except OSError:
        return False


def elastic_store(timeout: timedelta):
    """A store for this start of the job (:func:`round_store`) where torchrun's agents host the workers' store, or
    None where they do not (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, other launchers): ``env://`` then gives every
    start a fresh store already."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return round_store(dist.PrefixStore(f"fastvit/{os.environ.get('TORCHELASTIC_RUN_ID', '')}", agent), rank, world,
                       timeout)


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
    """A process group for the run: torchrun's (env://, a store of its own per restart round), or a one-process
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


def from_rank0(value):
    """``value`` as rank 0 holds it, on every rank (collective): what rank 0 alone worked out (its clock, a check of
    the run folder, a result), so that every rank goes on, or stops, alike."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank0_print(env: Env, *args):
    if env.rank == 0:
        print(*args, flush=True)


@contextlib.contextmanager
def rank0_warnings(env: Env, module: str = r"fastvit\.data"):
    """Inside, only rank 0 shows the warnings of ``module`` (a regex, as ``warnings.filterwarnings`` takes it): for
    work every rank does alike, such as reading the data set's index (a damaged or empty shard, a class without
    samples would otherwise be told once per rank). Other warnings, which may be a rank's own, show everywhere."""
    if env.rank == 0:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=module)
        yield


# what gloo and NCCL say when a peer process died (its connection closed, its communicator aborted)
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
              "NCCL communicator was aborted")


def lost_a_rank(error: BaseException) -> str | None:
    """The first line of a collective's error where it says another rank died (the rank's own traceback then says
    nothing about why: the dead rank's log does), else None."""
    text = str(error)
    if isinstance(error, RuntimeError) and any(s in text for s in _LOST_PEER):
        return text.strip().splitlines()[0]
    return None
