"""Host-side launch path of the kernel modules: launch arithmetic, the Triton launch, and the custom-op call.

At ViT sizes a fused op's wall time is mostly host time, so the per-call path

- avoids ``triton.cdiv`` and ``triton.next_power_of_2`` (ConstexprFunctions: about 4 us a call on the host, against
  0.1 us for the integer expressions) and asks for a device's SM count once;
- launches a kernel through :func:`launch`, which calls the compiled kernel directly after its first launch,
  found by a key cheaper than Triton's argument binder, skipping the rest of ``JITFunction.run`` too (knob reads,
  hooks, cache-key hashing);
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
import contextlib
import functools
import operator
import os
import threading
import types
import warnings

import torch
import triton
from torch.autograd import forward_ad
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor


# the dtypes the kernels load, compute in (fp32 inside) and store
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


@functools.lru_cache(maxsize=None)
def capability(device: torch.device) -> tuple:
    """(major, minor) compute capability of a CUDA device, asked once per device (the GEMM paths check it per
    call)."""
    return torch.cuda.get_device_capability(device)


# (major, minor) of the Triton that compiles the kernels, for the choices its releases make differently
TRITON_VERSION = tuple(int(v) for v in triton.__version__.split(".")[:2])


@torch.compiler.assume_constant_result  # torch.compile asks it at trace time instead of tracing the device query
def device_arch(device: torch.device) -> int:
    """Compute capability of a CUDA device as major * 10 + minor, for the kernels whose tiles depend on it; 90 for
    CPU tensors, so that the interpreter runs the tiles of an H100 / H200."""
    if device.type != "cuda":
        return 90
    major, minor = capability(device)
    return 10 * major + minor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the fallbacks sum and keep statistics for inputs of ``dtype``: fp32, or fp64 for fp64 (an fp64 model,
    as for gradcheck, stays fp64 throughout)."""
    return torch.promote_types(dtype, torch.float32)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call where ``t`` already has that dtype (``Tensor.to`` costs about 1 us on the
    host even then, and the ops' host path calls it many times)."""
    return t if t.dtype == dtype else t.to(dtype)


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, and False on the meta device (where a model is planned without
    memory), for which torch's raises."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str):
    """A context with autocast off on ``device_type``: ``torch.autocast(device_type, enabled=False)`` where autocast
    is on there, else a null context (entering and leaving torch.autocast costs ~10-20 us on the host even when it
    changes nothing)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def transformed() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, jacrev, ...) is running, or forward-mode AD
    (``torch.autograd.forward_ad.dual_level``). functorch takes only autograd Functions that define
    ``setup_context`` (and a vmap rule), forward AD only those with a ``jvp``, which the ops' Functions do not
    define: the ops run their plain-torch references instead, whose aten ops have both, as timm's do. (Asked of
    functorch's current level: dynamo answers it as eager does, where it would answer peek_interpreter_stack()
    with an interpreter of its own.)"""
    return torch._C._functorch.maybe_current_level() is not None or forward_ad._current_level >= 0


# whether torch.jit.trace is tracing: torch.jit.is_tracing() without its two Python calls (an op asks a few times
# per call, and at small batches a forward waits on this Python); dynamo folds it to None, as it does the call in
# nn.Module's own __call__
jit_tracing = torch._C._get_tracing_state


def exporting() -> bool:
    """Whether torch.export is tracing: the flag ``torch.compiler.is_exporting()`` returns. Read directly because
    torch 2.11's dynamo (the GPU machine's) answers ``is_exporting()`` True inside every torch.compile trace (2.14
    reads the flag): compiled code took the export branches there (a symbolic image size resampled per call, fp32
    CPU products traced as bf16 GEMMs)."""
    return torch.compiler._is_exporting_flag


def quiet_size_checks(fn):
    """Decorator for an op whose argument checks compare sizes. Under ``torch.jit.trace`` a size is a traced
    value, so each comparison warns (TracerWarning) that the trace may not generalise: attention's checks gave
    about 20 warnings a block, where timm's whole ViT gives 11. They ran on the example input, and what they
    compare (q against k and v, the token count against the patch grid) does not change with the batch, so those
    warnings are dropped while tracing. Outside a trace the wrapper costs a :data:`jit_tracing` call."""
    @functools.wraps(fn)
    def op(*args, **kwargs):
        if not jit_tracing():
            return fn(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return fn(*args, **kwargs)
    return op


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as rows of its last dim with unit stride, each ``t.stride(-2)`` after the last, as the row-wise kernels
    read them: ``t`` itself when contiguous (any leading shape: no reshape to (rows, D) and view back, each ~1 us on
    the host and, with grad, an autograd node), else a 2D (rows, D) view or copy. A contiguous tensor whose
    next-to-last dim has size 1 may carry any stride there (torch ignores it: a (B, D, 1) map transposed to
    (B, 1, D) has stride(-2) 1), so it is taken as it is only where that stride is D (or it has no rows to read)."""
    if t.dim() >= 2 and t.is_contiguous() and (t.stride(-2) == t.shape[-1] or not t.numel()):
        return t
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def row_programs(n_rows: int, device: torch.device) -> int:
    """Programs of a row-wise backward kernel: a few per SM, each folding its rows into one fp32 partial sum of
    the weight/bias gradients, reduced after (fewer partials than rows, and no atomics)."""
    return min(n_rows, 4 * sm_count(device))


# (id of the kernel, a module global; device; what Triton specialises each argument on; the keyword arguments) ->
# (the compiled kernel, the values of the parameters passed by keyword, in the kernel's signature order)
_COMPILED = {}
_COMPILED_MAX = 4096  # emptied when it grows past this (a run with ever-new shapes), rebuilt as launches come
_KEY_TENSORS = frozenset((torch.Tensor, torch.nn.Parameter))
_KEY_SCALARS = frozenset((int, float, bool, type(None)))
_DATA_PTR = torch.Tensor.data_ptr
_DTYPE = operator.attrgetter("dtype")


def _picker(positions):
    """args -> the tuple of the arguments at ``positions`` (operator.itemgetter, which gives a bare value for one)."""
    if len(positions) == 1:
        (i,) = positions
        return lambda args: (args[i],)
    return operator.itemgetter(*positions) if positions else lambda args: ()


class _Layout:
    """Where the tensors, scalars and TMA descriptors sit among a launch's arguments, for one tuple of argument
    types: found once per tuple, so that a key is built by C-level maps instead of a Python loop over the arguments
    (key and lookup 10 -> 5.5 us at the attention forward's 30, timed alone). ``valid`` is False where an argument
    is of none of these kinds."""

    def __init__(self, types):
        kinds = [_KEY_TENSORS, _KEY_SCALARS, (TensorDescriptor,)]
        positions = [[i for i, t in enumerate(types) if t in kind] for kind in kinds]
        self.valid = sum(map(len, positions)) == len(types)
        self.tensors, self.scalars, self.descriptors = map(_picker, positions)
        self.has_descriptors = bool(positions[2])
        # the arguments start with every tensor (what a Bound launch takes)
        self.leading_tensors = len(positions[0]) if positions[0] == list(range(len(positions[0]))) else None


_LAYOUTS = {}  # a launch's argument types -> their _Layout (few: one or two per launch site)


def _launch_key(kernel, device, args, kwargs):
    """A key that fixes the compiled variant Triton's binder would pick, cheaper to build than the binder's own:
    a tensor's dtype and 16-byte alignment (all Triton specialises a pointer on), a TMA descriptor's dtype and
    block, any other argument's type and value (an int's value fixes whether it is 1 or a multiple of 16; it is a
    shape or stride, of few values), and the keyword arguments (constexprs, ``num_warps``, ``num_stages``). None
    when an argument is of another type."""
    types = tuple(map(type, args))
    layout = _LAYOUTS.get(types)
    if layout is None:
        layout = _LAYOUTS.setdefault(types, _Layout(types))
    if not layout.valid:
        return None
    tensors = layout.tensors(args)
    pointers = tuple(map(_DATA_PTR, tensors))
    # one test where every pointer is aligned (the usual case), a flag per pointer otherwise
    aligned = True if functools.reduce(operator.or_, pointers, 0) & 15 == 0 else tuple(p & 15 == 0 for p in pointers)
    # the layout stands for the argument types (one object per types tuple, hashed by identity)
    key = (id(kernel), device, layout, tuple(map(_DTYPE, tensors)), aligned, layout.scalars(args),
           tuple(kwargs.items()))
    if layout.has_descriptors:  # Triton specialises a descriptor on its dtype and block shape
        key += tuple((d.base.dtype, tuple(d.block_shape)) for d in layout.descriptors(args))
    return key


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, with the Python of Triton's launch cut to a dictionary lookup.

    The first launch of each variant (:func:`_launch_key`) goes through Triton, which binds the arguments,
    compiles and launches; later ones call that compiled kernel exactly as ``JITFunction.run`` does (the same
    argument values, device, stream, launch metadata and hooks), skipping the binder, the knob reads and the
    cache-key hashing (bench/overhead.py's machine: 5.5 us a launch, 7.0 with the binder, more through all of
    ``JITFunction.run``). Interpreted kernels (TRITON_INTERPRET=1) always take Triton's path. The knobs
    ``JITFunction.run`` reads at every launch (``knobs.runtime.debug``, instrumentation) count from a variant's
    first launch. While a dispatch mode traces the call (fake tensors, AOTAutograd's
    functionalisation inside ``torch.compile``), the launch is recorded through ``torch.library.wrap_triton`` as a
    graph node; inside a compiled graph's own call of the op ``wrap_triton`` is off and gives the kernel back.

    Returns the call's :class:`Bound` launch where a later call with the same signature may take it (the variant
    cached, every pointer 16-byte aligned, the tensors first among the arguments), else None.
    """
    if type(kernel) is not JITFunction:
        kernel[grid](*args, **kwargs)
        return
    if torch._C._len_torch_dispatch_stack():
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    key = _launch_key(kernel, device, args, kwargs)
    entry = _COMPILED.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        return _bound(key, _remember(kernel, key, compiled, len(args), kwargs), grid, device, args)
    compiled, keyword_values = entry  # the key holds the keyword arguments: their values are the cached ones
    _run(compiled, _grid3(grid), driver.active.get_current_stream(device), args + keyword_values)
    return _bound(key, entry, grid, device, args)


def _grid3(grid):
    """A launch grid of one to three ints as three."""
    return (*grid, *(1,) * (3 - len(grid)))


def _run(compiled, grid, stream, values):
    """Launches a compiled kernel on a grid of three ints as ``JITFunction.run`` does: every argument value in the
    kernel's signature order, the launch metadata and hooks."""
    runtime = knobs.runtime
    enter_hook = runtime.launch_enter_hook
    # CompiledKernel.launch_metadata returns None at once without an enter hook
    metadata = None if enter_hook is None else compiled.launch_metadata(grid, stream, *values)
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, metadata,
                 enter_hook, runtime.launch_exit_hook, *values)


class Bound:
    """One launch of a compiled kernel with everything but its leading tensors fixed (grid, sizes, strides, scalars,
    constexprs, device): ``bound(*tensors)`` launches it as :func:`launch` would, for tensors of the dtypes it was
    bound with, each 16-byte aligned (:func:`aligned`), while ``device`` is the current one. A launch plan keeps one
    per call signature (:class:`Plans`), so that a call of that signature does no more than its allocations and
    this."""

    __slots__ = ("compiled", "grid", "device", "tail")

    def __init__(self, compiled, grid, device, tail):
        self.compiled, self.grid, self.device, self.tail = compiled, grid, device, tail

    def __call__(self, *tensors):
        _run(self.compiled, self.grid, driver.active.get_current_stream(self.device), tensors + self.tail)


def _bound(key, entry, grid, device, args):
    """The :class:`Bound` launch of a call :func:`launch` ran from cache ``entry`` under ``key``, or None: not
    cached, a pointer not 16-byte aligned (Triton compiled for the pointers it saw), or tensors not all first among
    the arguments."""
    if entry is None or key[4] is not True or key[2].leading_tensors is None:
        return None
    compiled, keyword_values = entry
    return Bound(compiled, _grid3(grid), device, args[key[2].leading_tensors:] + keyword_values)


def aligned(*tensors) -> bool:
    """Whether every one of ``tensors`` starts at a 16-byte aligned address (what a :class:`Bound` launch takes)."""
    bits = 0
    for t in tensors:  # a loop: faster here than reduce over map
        bits |= t.data_ptr()
    return not bits & 15


class PlannedLaunch:
    """``launch(kernel, grid, *tensors, *scalars, **flags)`` at one launch site for one call signature (a plan's
    part): after the first launch, its :class:`Bound` launch, taken while the input tensors are aligned as they
    were then. ``bindable``: whether the plan is kept for later calls (else binding would be wasted)."""

    __slots__ = ("kernel", "grid", "flags", "bindable", "bound")

    def __init__(self, kernel, grid, flags, bindable):
        self.kernel, self.grid, self.flags, self.bindable, self.bound = kernel, grid, flags, bindable, None

    def __call__(self, tensors, inputs, scalars):
        """Launches on ``tensors`` (every tensor argument, in the kernel's order) and ``scalars()``, the arguments
        after them (asked only when the launch goes through :func:`launch`). ``inputs``: those of ``tensors`` the
        caller did not just allocate (whose alignment may change from call to call)."""
        bound = self.bound
        if bound is not None and aligned(*inputs) and bound.device == driver.active.get_current_device():
            bound(*tensors)
            return
        bound = launch(self.kernel, self.grid, *tensors, *scalars(), **self.flags)
        if self.bindable and bound is not None:  # an unaligned call keeps the aligned calls' bound launch
            self.bound = bound


class Plans(dict):
    """A launcher's plans by call signature: what its first call of a signature worked out (checks, dtypes,
    launch configuration, a :class:`Bound` launch), kept so that later calls only allocate and launch. Emptied
    with :func:`launch`'s cache (``forget``), when it grows past ``_COMPILED_MAX``, and where a harness swaps
    kernels (bench/overhead.py's stubs). Only plain eager calls use them (:func:`plans_apply`)."""

    def __init__(self):
        super().__init__()
        _PLANS.append(self)

    def keep(self, key, plan):
        if len(self) >= _COMPILED_MAX:
            self.clear()
        self[key] = plan
        return plan


_PLANS = []


def forget():
    """Empties every cache of compiled launches: :func:`launch`'s and the launchers' :class:`Plans`."""
    _COMPILED.clear()
    for plans in _PLANS:
        plans.clear()


def plans_apply(x) -> bool:
    """Whether a launcher called with ``x`` (its first tensor) may use and keep plans: compiled kernels (not the
    interpreter, whose launches go through Triton), a plain tensor, in eager mode (not traced by dynamo, no
    dispatch mode: fake or functional tensors carry no addresses to launch on)."""
    return (not _INTERPRETING and not torch.compiler.is_compiling() and type(x) in _KEY_TENSORS
            and not torch._C._len_torch_dispatch_stack())


def _remember(kernel, key, compiled, n_positional, kwargs):
    """Caches a kernel Triton compiled and launched for ``key``, when a later launch can rebuild its argument
    values: every parameter after the positional ones passed by keyword (none left to its default); returns the
    cache entry, or None where not cached: None for either (an argument type the key does not cover; Triton did
    not launch, e.g. a compile hook)."""
    by_keyword = tuple(kernel.arg_names[n_positional:])
    if key is None or compiled is None or not all(name in kwargs for name in by_keyword):
        return None
    if len(_COMPILED) >= _COMPILED_MAX:
        _COMPILED.clear()
    entry = _COMPILED[key] = (compiled, tuple(kwargs[name] for name in by_keyword))
    return entry


# argument types a plain eager call may carry; a tensor subclass (fake, functional, DTensor, ...) is none of them
_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter, int, float, bool, type(None), torch.dtype, str))


def plain_tensors(args) -> bool:
    """Whether every one of ``args`` is a plain tensor, parameter, scalar or None: no tensor subclass (a quantised
    weight, a DTensor, a fake tensor), which a call of our kernels or oneDNN's would not see through."""
    return all(map(_PLAIN_TYPES.__contains__, map(type, args)))


def _untraced(args):
    """Whether a call with ``args`` (the first one a tensor) runs on real tensors outside any trace: not traced by
    dynamo (checked first, so that dynamo folds it and never sees the rest), no dispatch mode (fake tensors,
    functionalisation, make_fx, FLOP counters), no TorchScript trace, plain tensors only, and not on the meta
    device."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or jit_tracing():
        return False
    return plain_tensors(args) and not args[0].is_meta


def _plain_eager(args):
    """Whether a call with ``args`` may skip the dispatcher: :func:`_untraced`, and the profiler off (it records
    the op by name)."""
    return _untraced(args) and not torch._C._autograd._profiler_enabled()


class _Unrecorded:
    """The context an autograd Function's forward gets from :func:`apply` when autograd records nothing."""

    def save_for_backward(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


def records_autograd(args) -> bool:
    """Whether autograd would record a call with ``args``: grad mode on and a tensor argument requiring grad."""
    if torch.is_grad_enabled():
        for a in args:
            if type(a) in _KEY_TENSORS and a.requires_grad:
                return True
    return False


def triton_in_backward(use_triton: bool) -> bool:
    """Whether a Function's backward runs our kernels (``use_triton``, as its forward did): not where autograd
    records the backward itself (``create_graph=True``: double backward, gradient penalties, Hessian-vector
    products). The kernels have no derivative, so their outputs would enter that graph as constants and a second
    derivative would silently lose their terms; the torch fallback computes the same gradients by aten ops, which
    have derivatives."""
    return use_triton and not torch.is_grad_enabled()


def eager_training_call(args) -> bool:
    """Whether a call with ``args`` (the first one a tensor) is recorded by autograd on real tensors, outside any
    trace (:func:`_untraced`)."""
    return records_autograd(args) and _untraced(args)


def inference_call(args) -> bool:
    """Whether a call with ``args`` (the first one a tensor) is eager inference on real tensors: nothing for
    autograd to record, and no trace (:func:`_untraced`). Grad mode is asked here first: under no_grad, where
    inference runs, that answers without a call of :func:`records_autograd` (at small CPU batches a forward waits
    on each Python call between its kernels)."""
    return (not torch.is_grad_enabled() or not records_autograd(args)) and _untraced(args)


def plain_inference(args) -> bool:
    """:func:`inference_call` with the profiler off (:func:`_plain_eager`): where an op may run its forward body
    alone, without the autograd Function, its context and the custom-op layers around it. At small batches a GPU
    forward waits on this host time; a profiled call keeps the layers, through which the profiler names the op.
    Grad mode first, as in :func:`inference_call`."""
    return (not torch.is_grad_enabled() or not records_autograd(args)) and _plain_eager(args)


class _Local(threading.local):
    plain = False  # inside :func:`apply`'s call of a forward in plain eager mode: its EagerOps need no check


_LOCAL = _Local()


def apply(function, *args):
    """``function.apply(*args)`` for one of the ops' autograd Functions, or where autograd has nothing to record,
    in plain eager mode (:func:`_plain_eager`), its forward alone on a context that keeps nothing: the same outputs,
    without ``Function.apply``'s ~3 us of graph bookkeeping. In plain eager mode the forward's own custom ops run
    their bodies without checking again (the forward's tensors come from ``args``, in the same mode)."""
    if not _plain_eager(args):
        return function.apply(*args)
    local = _LOCAL
    outer, local.plain = local.plain, True
    try:
        if records_autograd(args):
            return function.apply(*args)
        return function.forward(_Unrecorded(), *args)
    finally:
        local.plain = outer


def kernels_called(fn, depth=4):
    """The Triton kernels ``fn`` may launch: JIT functions its code names (globals, attributes of the modules it
    names, nested code) and, through the fastvit.kernels functions it calls and the methods of the fastvit.kernels
    classes it names, theirs, ``depth`` calls deep.

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
        elif depth and obj is not fn and getattr(obj, "__module__", "").startswith("fastvit.kernels"):
            # a function, or a class whose methods launch (a launcher's plan)
            methods = [obj] if isinstance(obj, types.FunctionType) else (
                [m for m in vars(obj).values() if isinstance(m, types.FunctionType)] if isinstance(obj, type) else [])
            for method in methods:
                kernels.update((id(k), k) for k in kernels_called(method, depth - 1))
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
        # a backward that autograd records (see triton_in_backward) runs the body under the profiler too: the
        # registered op has no derivative, its body's aten ops do
        if _LOCAL.plain or _plain_eager(args) or eager_training_call(args):
            return self.fn(*args)
        return self.overload(*args)


def eager_op(name):
    """Decorator: ``@eager_op("bias_gelu_fwd")`` over a function gives its :class:`EagerOp`."""
    return functools.partial(EagerOp, name)
