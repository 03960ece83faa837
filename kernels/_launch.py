"""Host-side launch path of the kernel modules: launch arithmetic, the Triton launch, and the custom-op call.

At ViT sizes a fused op's wall time is mostly host time, so the per-call path

- avoids ``triton.cdiv`` and ``triton.next_power_of_2`` (ConstexprFunctions: about 4 us a call on the host, against
  0.1 us for the integer expressions) and asks for a device's SM count once;
- launches a kernel through :func:`launch`, which keeps Triton's argument binder (so the kernel variant is the one
  Triton's JIT picks) but calls the compiled kernel directly after its first launch, skipping the rest of
  ``JITFunction.run`` (knob reads, hooks, cache-key building: about 5 us per launch);
- calls the ops' Python bodies directly in plain eager mode (:class:`EagerOp`), where the ``torch.library``
  dispatcher adds about 7 us per call and nothing needs to see the call; tracing, fake tensors, tensor subclasses
  and the profiler still go through the registered op.

Each op is a ``torch.library.triton_op``, so ``torch.compile`` traces into it instead of keeping it as an opaque
call: AOTAutograd decomposes the op into its body, a kernel launch becomes a ``triton_kernel_wrapper`` node (Triton
kernels that inductor schedules, with its own buffers, around which it fuses) and a torch fallback becomes the
aten ops it calls (which inductor fuses as it would timm's). Under Triton's interpreter a kernel is no JIT function
that a graph can hold, so there the ops stay opaque custom ops.

``bench/overhead.py`` measures the result against the eager torch ops each fused op replaces.
"""
import collections.abc
import functools
import os
import types

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction


# Triton reads TRITON_INTERPRET once, at import; so do we (a plain function of a constant, which dynamo folds)
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """Whether Triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRETING


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0 (what triton.cdiv computes)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (what triton.next_power_of_2 computes)."""
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 for CPU tensors (the interpreter), so tests split work too."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def row_programs(n_rows: int, device: torch.device) -> int:
    """Programs of a row-wise backward kernel: a few per SM, each folding its rows into one fp32 partial sum of
    the weight/bias gradients, reduced after (fewer partials than rows, and no atomics)."""
    return min(n_rows, 4 * sm_count(device))


# (id of the kernel, a module global; device; Triton's specialisation of the arguments; launch options) -> the
# compiled kernel
_COMPILED = {}


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, with the Python of Triton's launch cut to its argument binder.

    The first launch of each specialisation (the binder's per-argument dtypes, 16-byte alignment and
    constexprs, plus ``num_warps``/``num_stages``) goes through Triton, which compiles and launches; later ones
    call that compiled kernel exactly as ``JITFunction.run`` does (same device, stream, launch metadata and hooks).
    Interpreted kernels (TRITON_INTERPRET=1) always take Triton's path. The knobs ``JITFunction.run`` reads at every
    launch (``knobs.runtime.debug``, instrumentation) count from a specialisation's first launch. While a dispatch
    mode traces the call (fake tensors, AOTAutograd's functionalisation inside ``torch.compile``), the launch is
    recorded through ``torch.library.wrap_triton`` as a graph node; inside a compiled graph's own call of the op
    ``wrap_triton`` is off and gives the kernel back.
    """
    if type(kernel) is not JITFunction:
        kernel[grid](*args, **kwargs)
        return
    if torch._C._len_torch_dispatch_stack():
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    bound, specialization, options = kernel.device_caches[device][4](*args, **kwargs)
    key = (id(kernel), device, *specialization, *options.items())  # hash(kernel) takes a lock and hashes its source
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **kwargs)
        if compiled is not None:  # None: Triton did not launch it (a compile hook or asynchronous compilation)
            _COMPILED[key] = compiled
        return
    stream = driver.active.get_current_stream(device)
    values = bound.values()
    size = len(grid)
    runtime = knobs.runtime
    compiled.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream, compiled.function,
                 compiled.packed_metadata, compiled.launch_metadata(grid, stream, *values),
                 runtime.launch_enter_hook, runtime.launch_exit_hook, *values)


# argument types a plain eager call may carry; a tensor subclass (fake, functional, DTensor, ...) is none of them
_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter, int, float, bool, type(None), torch.dtype))


def _plain_eager(args):
    """Whether a call with ``args`` (the first one a tensor) may skip the dispatcher: not traced by dynamo
    (checked first, so that dynamo folds it and never sees the rest), no dispatch mode (fake tensors,
    functionalisation, make_fx, FLOP counters), the profiler off (it records the op by name), plain tensors only,
    and not on the meta device."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or \
            torch._C._autograd._profiler_enabled():
        return False
    for a in args:
        if type(a) not in _PLAIN_TYPES:
            return False
    return not args[0].is_meta


def kernels_called(fn, depth=4):
    """The Triton kernels ``fn`` may launch: JIT functions its code names (globals, attributes of the modules it
    names, nested code) and, through the fastvit.kernels functions it calls, theirs, ``depth`` calls deep.

    A triton_op finds its kernels only where its body writes ``wrap_triton(kernel)``; ours reach them through
    :func:`launch`. torch.compile's AOTAutograd cache hashes these kernels' sources into its key, so that editing
    a kernel cannot reuse a graph compiled from the old one."""
    names, codes = set(), [fn.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    named = [fn.__globals__[n] for n in names if n in fn.__globals__]
    named += [getattr(m, n) for m in named if isinstance(m, types.ModuleType) for n in names if hasattr(m, n)]
    kernels = {}
    for obj in named:
        if isinstance(obj, JITFunction):
            kernels[id(obj)] = obj
        elif (depth and isinstance(obj, types.FunctionType) and obj is not fn
              and obj.__module__.startswith("fastvit.kernels")):
            kernels.update((id(k), k) for k in kernels_called(obj, depth - 1))
    return list(kernels.values())


class KernelsOf(collections.abc.Sequence):
    """``kernels_called(fn)``, worked out on first use: an op's body may call helpers that its module defines
    after it."""

    def __init__(self, fn):
        self.fn = fn

    @functools.cached_property
    def kernels(self):
        return kernels_called(self.fn)

    def __getitem__(self, i):
        return self.kernels[i]

    def __len__(self):
        return len(self.kernels)


class EagerOp:
    """A ``torch.library.triton_op`` named ``fastvit::<name>`` (its schema from ``fn``'s annotations; a
    ``custom_op`` under the interpreter) that runs ``fn`` straight away in plain eager mode and through the
    dispatcher otherwise. ``register_fake`` gives the op a shape-only implementation, used instead of ``fn`` for
    fake tensors (``fn`` itself runs only where AOTAutograd decomposes the op)."""

    def __init__(self, name, fn):
        self.fn = fn
        qualname = f"fastvit::{name}"
        if interpreting():
            self.op = torch.library.custom_op(qualname, fn, mutates_args=())
        else:
            self.op = torch.library.triton_op(qualname, fn, mutates_args=())
            # torch's table behind get_triton_kernels_for_op (tests/test_launch.py checks it is read)
            kernel_table = getattr(torch._library.triton, "triton_ops_to_kernels", None)
            if kernel_table is not None:
                kernel_table[qualname] = KernelsOf(fn)
        self.overload = getattr(torch.ops.fastvit, name).default
        self.register_fake = self.op.register_fake

    def __call__(self, *args):
        if _plain_eager(args):
            return self.fn(*args)
        return self.overload(*args)


def eager_op(name):
    """Decorator: ``@eager_op("bias_gelu_fwd")`` over a function gives its :class:`EagerOp`."""
    return functools.partial(EagerOp, name)
