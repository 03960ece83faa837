"""Pick the fastest implementation of an op for a call shape on this GPU or CPU: measured once, then cached.

``backend="auto"`` attention has several candidates on a GPU (flash-attn, the flash / cuDNN / memory-efficient
kernels behind torch's scaled_dot_product_attention, our Triton kernel) and which one wins depends on the GPU,
dtype, sequence length and head size. Each distinct key is timed once per process on random inputs of the call's
shape (forward, or forward + backward when training) and the winner is kept in memory and in a JSON file
(``fastvit.cache.cache_dir()``: ``$FASTVIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastvit``, ``~/.cache/fastvit``),
so later processes on the same GPU, versions and fastvit kernel code skip the measurement. Before it is timed, a
candidate's output is checked against a reference (torch's SDPA; the unfused GEMM path): one that disagrees is
dropped with a warning.
Nothing is measured while torch.compile / torch.export trace or a CUDA graph is captured: those calls take the cached
winner, or the caller's default.

On CPU (:func:`fastest_on_cpu`) the same holds per CPU model, thread count and torch version: which of oneDNN's and
MKL's GEMMs is faster differs between CPUs (fc1 with its GELU in oneDNN's epilogue, ``fastvit.onednn``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import platform
import time
import warnings

import torch

from fastvit.cache import cache_dir

_WINNERS: dict[tuple, str] = {}
# a caller's own key for a call (plain values, cheap to build) -> the winner :func:`fastest` settled for it
_SETTLED: dict[tuple, str] = {}
_DISK: dict | None = None  # the JSON file's winners, read once per process (``clear`` forgets them)


def cache_path() -> pathlib.Path:
    return cache_dir() / "autotune.json"


@functools.lru_cache(maxsize=None)  # a device's name and the versions cannot change within a process
def _environment(device_index: int) -> tuple:
    """What a timing is valid for besides the call: the GPU model, the torch / Triton versions and fastvit's own
    kernel code (:func:`code_version`)."""
    import triton
    return torch.cuda.get_device_name(device_index), torch.__version__, triton.__version__, code_version()


CODE_TAG = "fastvit-code:"


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """``fastvit-code:`` and a digest of the code a GPU timing measured: the Triton kernels and the ops that run
    the candidates. A winner timed on other code (before an upgrade, or before a kernel changed what it computes:
    fc2's prologue took fc1's bias once) is measured again, never trusted."""
    import fastvit.kernels
    digest = hashlib.sha256()
    for path in (*sorted(pathlib.Path(fastvit.kernels.__file__).parent.glob("*.py")),
                 pathlib.Path(__file__).with_name("ops.py")):
        digest.update(path.read_bytes())
    return CODE_TAG + digest.hexdigest()[:16]


def forget_other_code() -> int:
    """Drop from the disk file the GPU winners timed on other code than this (or before timings named their code);
    returns how many. ``bench/gpu_suite.sh`` starts with it, so its results folder lists the choices of the code
    it measured only. CPU choices (oneDNN's GEMMs, no kernel of ours) stay."""
    data = _read_disk()

    def stale(key):
        environment = json.loads(key)[2]
        tags = [v for v in environment if isinstance(v, str) and v.startswith(CODE_TAG)]
        return tags != [code_version()] if tags else len(environment) == 3  # 3: the GPU key before code versions
    kept = {k: v for k, v in data.items() if not stale(k)}
    if len(kept) < len(data):
        _write_file(kept)
    clear()
    return len(data) - len(kept)


def _read_disk() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _disk() -> dict:
    global _DISK
    if _DISK is None:
        _DISK = _read_disk()
    return _DISK


def _write_disk(key: str, winner: str) -> None:
    """Add one winner to the JSON file (re-read, so winners other processes wrote stay; written to a temporary
    file, then renamed: a crash leaves the old file)."""
    _disk()[key] = winner
    data = _read_disk()
    data[key] = winner
    _write_file(data)


def _write_file(data: dict) -> None:
    """Replace the JSON file by ``data`` (a temporary file, then renamed: a crash leaves the old file)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:  # a read-only home: keep the in-memory winner only
        pass


def can_measure() -> bool:
    """Whether timing runs may happen now: a real CUDA device, and no tracing or graph capture in progress."""
    return (torch.cuda.is_available() and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def time_cuda(fn, repeats: int = 10) -> float:
    """Median seconds of ``fn()`` on the current CUDA stream, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def fastest(op: str, device_index: int, fields: tuple, names, make_runner, default: str, measure=None,
            agrees=None, call_key=None, report_failures=False) -> str:
    """The fastest of the implementations ``names`` of ``op`` for a call described by ``fields`` (a tuple of
    (name, value) pairs) on CUDA device ``device_index``.

    ``make_runner(name)`` gives a zero-argument callable running that implementation once on inputs shaped like
    the call; it is only asked for when a measurement happens. A runner that raises cannot run the call and is
    skipped, with a warning naming the error where ``report_failures`` (for implementations that should run every
    call, such as our fused GEMMs: a failure there is a bug to see, not a shape the kernel lacks).
    ``agrees(name)``, when given, checks an implementation's result against a reference before it is timed: one
    that disagrees (a kernel miscompiled for this GPU, say) is skipped with a warning, so speed never
    wins over correctness. With no winner cached and no measurement possible now (see ``can_measure``),
    ``default``.

    ``call_key``, when given, names the call in the caller's own terms: once the choice is settled (found or
    measured, not a default for now), :func:`settled` answers it for that key without this call.
    """
    return _fastest(op, fields, _environment(device_index), names, make_runner, default, measure or time_cuda,
                    agrees, can_measure, call_key, report_failures)


def settled(call_key: tuple):
    """The implementation :func:`fastest` settled for a call it was given as ``call_key``, else None. A caller
    that asks for every call (each fused GEMM, each attention on a GPU: four per block) skips building fields and
    runners once the choice is made (a whole choice 5.0 -> 3.2 us for a GEMM, 8.8 -> 4.2 us for attention, on a CPU
    with a pretend GPU)."""
    return _SETTLED.get(call_key)


def cached(op: str, device_index: int, fields: tuple, names, default: str) -> str:
    """:func:`fastest`'s winner where one was measured (in this process or the file), else ``default``: never
    times anything (for a choice made while torch.compile traces)."""
    return _fastest(op, fields, _environment(device_index), names, None, default, None, None, lambda: False)


@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_cpu(fn, repeats: int = 5, budget: float = 0.02, max_repeats: int = 100) -> float:
    """Fewest seconds of ``fn()`` over ``repeats`` calls, or more for a short call: it repeats until ``budget``
    seconds have passed (at most ``max_repeats`` calls), after two warm-up calls (the first call of a oneDNN GEMM
    builds its primitive). On a shared CPU load only adds time, so the minimum over many calls is the call's own:
    with three calls of a 0.4 ms product, the choice between two candidates 20% apart flipped from run to run."""
    fn()
    fn()
    best, spent, calls = float("inf"), 0.0, 0
    while calls < repeats or (spent < budget and calls < max_repeats):
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        best, spent, calls = min(best, seconds), spent + seconds, calls + 1
    return best


def fastest_on_cpu(op: str, fields: tuple, names, make_runner, default: str, call_key=None) -> str:
    """:func:`fastest` for a call on CPU tensors, timed by :func:`time_cpu` once per ``fields``, CPU model and vector
    ISA, thread count and torch version; ``default`` while torch.compile traces. ``call_key`` as for
    :func:`fastest` (it must then hold the thread count)."""
    # the vector ISA PyTorch dispatches to as well: one model name may cover CPUs with and without AVX-512
    environment = (_cpu_name(), torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), torch.__version__)
    return _fastest(op, fields, environment, names, make_runner, default, time_cpu, None,
                    lambda: not torch.compiler.is_compiling(), call_key)


def _fastest(op, fields, environment, names, make_runner, default, measure, agrees, measurable,
             call_key=None, report_failures=False) -> str:
    """:func:`fastest`'s choice for a call whose timings hold on ``environment``; ``measurable()`` says whether
    timing may happen now."""
    key = (op, fields, environment)
    winner = _WINNERS.get(key)
    if winner is None:
        winner = _choose(key, names, make_runner, default, measure, agrees, measurable, report_failures)
        if winner is None:  # not measurable now: the default, remembered nowhere
            return default
        _WINNERS[key] = winner
    if call_key is not None:
        _SETTLED[call_key] = winner
    return winner


def _choose(key, names, make_runner, default, measure, agrees, measurable, report_failures):
    """The winner for ``key`` (op, fields, environment) from the disk file or measured now; None where it is not
    in the file and cannot be measured now."""
    op, fields, _ = key
    disk_key = json.dumps(key)
    winner = _disk().get(disk_key)
    if winner not in names:
        if not measurable():  # maybe later (tracing or a graph capture ends): nothing is remembered
            return None
        times = {}
        for name in names:
            try:
                if agrees is not None and not agrees(name):
                    warnings.warn(f"fastvit.autotune: {op} implementation {name!r} disagrees with the reference "
                                  f"for {dict(fields)}; it is not used", RuntimeWarning, stacklevel=4)
                    continue
                times[name] = measure(make_runner(name))
            except Exception as error:  # noqa: BLE001  an implementation that cannot run this call is no candidate
                if report_failures:
                    warnings.warn(f"fastvit.autotune: {op} implementation {name!r} failed for {dict(fields)} "
                                  f"({type(error).__name__}: {error}); it is not used", RuntimeWarning, stacklevel=4)
                continue
        if not times:  # nothing else runs this call: remember the default, so it is not measured again
            return default
        winner = min(times, key=times.get)
        _write_disk(disk_key, winner)
    return winner


def clear() -> None:
    """Forget the in-memory winners and what was read of the disk file (the file stays)."""
    global _DISK
    _WINNERS.clear()
    _SETTLED.clear()
    _DISK = None
