"""When a fused op may stand in for a group of a model's submodules: the drop-in rule.

A fused op reads a Linear's or LayerNorm's parameters instead of calling the module, or skips a module that
would return its input, only while each module is the plain torch module it was built as: its own class (no
subclass, wrapper such as PEFT's LoRA, or quantised layer), its original forward (instance and class), no hooks of
its own or global ones, weight and bias in its parameter table. Anything else is called as timm's model calls it,
so user edits always take effect. Under torch.fx every module call stays a node of its own.
"""
import torch
import torch.nn as nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from fastvit import ops
from fastvit.drop import DropPath
from fastvit.kernels._launch import autocast_enabled


# torch's tables of global module hooks (registered and removed in place, never rebound), read on every check by
# any() over this tuple: one C call, where a function of our own would cost a Python call (a block asks ~20 times)
_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, f"_global_{kind}_hooks")
                      for kind in ("forward", "forward_pre", "backward", "backward_pre"))


_MODULE_CALL = nn.Module.__call__


def fx_tracing() -> bool:
    """``is_fx_symbolic_tracing()``, answered at once where torch.fx traces nothing: its tracer replaces
    ``nn.Module.__call__`` while it runs the traced forward. (torch 2.14 keeps the tracing flag in a thread-local,
    whose read costs ~0.4 us while unset, and the model asks about a dozen times a block.)"""
    return nn.Module.__call__ is not _MODULE_CALL and is_fx_symbolic_tracing()


# each fusable class's forward as fastvit found it (keep_original_forward; others when first checked): a class-level
# patch (``nn.GELU.forward = ...``) then reads as a modified module, as an instance-level one does
_ORIGINAL_FORWARD = {}


def keep_original_forward(*classes):
    """Record the classes' forward now, at import, before user code can patch them."""
    for cls in classes:
        _ORIGINAL_FORWARD.setdefault(cls, cls.forward)


keep_original_forward(nn.Linear, nn.LayerNorm, nn.GELU, nn.Conv2d, nn.Dropout, nn.Identity, nn.Sequential)


def runs_unmodified(module, cls) -> bool:
    """Whether ``module`` is exactly a ``cls`` with no hooks (its own or global) and no patched ``forward``, on
    the instance or the class.

    Only then may a fused kernel read its parameters instead of calling it: a subclass, a wrapper (LoRA), a
    parametrised or quantised layer, a weight that is not a parameter, a hook or a patched forward all have to run as
    the user left them.
    """
    return not any(_GLOBAL_HOOKS) and unedited(module, cls)


def all_unedited(modules, classes) -> bool:
    """:func:`runs_unmodified` for each module of ``modules`` with the class at its place in ``classes``, the
    global tables read once (a block's CPU inference asks about all its layers at once)."""
    return not any(_GLOBAL_HOOKS) and all(map(unedited, modules, classes))


def unedited(module, cls) -> bool:
    """:func:`runs_unmodified` but for global hooks (for a module that timm's forward would not call either).
    Reads the instance's own dict, where nn.Module keeps its hook tables and parameter table (a quarter less host
    time than attribute lookups, which search the class first; a block asks ~25 times per call)."""
    d = module.__dict__
    return (type(module) is cls and "forward" not in d
            and _ORIGINAL_FORWARD.setdefault(cls, cls.forward) is cls.forward
            and not (d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"]
                     or d["_backward_pre_hooks"])
            and (cls not in _WEIGHTED or ("weight" in d["_parameters"] and "bias" in d["_parameters"])))


# layers whose weight and bias a fused kernel reads from the parameter table (None where there is none, as
# nn.Linear's bias can be): one set as a plain tensor or a buffer instead (hypernetworks, functional
# meta-learning) is an edit
_WEIGHTED = frozenset((nn.Linear, nn.LayerNorm, nn.Conv2d))


def weight_and_bias(module):
    """(weight, bias) of a Linear / LayerNorm / Conv2d, read from its parameter table: nn.Module's attribute lookup
    costs about 1 us a name on the host, and a fused block reads a dozen per call."""
    params = module._parameters
    return params["weight"], params["bias"]


def passes_through(module) -> bool:
    """Whether calling ``module`` would return its input unchanged, so the call (~3 us on the host) may be skipped:
    an unmodified nn.Identity, or an unmodified nn.Dropout / DropPath that is off (eval mode or p = 0). Never under
    torch.fx, where each module call is a node of its own."""
    return _returns_input(module) and not any(_GLOBAL_HOOKS) and not fx_tracing()


def all_pass_through(modules) -> bool:
    """:func:`passes_through` for every module of ``modules``, torch.fx and the global tables asked once."""
    return not any(_GLOBAL_HOOKS) and all(map(_returns_input, modules)) and not fx_tracing()


def _returns_input(module) -> bool:
    """An unedited nn.Identity, or an unedited nn.Dropout / DropPath that is off (global hooks and torch.fx aside)."""
    kind = type(module)
    if kind is nn.Identity:
        off = True
    elif kind is nn.Dropout:
        off = not module.training or module.p == 0
    elif kind is DropPath:
        off = not module.training or module.drop_prob == 0
    else:
        return False
    return off and unedited(module, kind)


def call(module, x):
    """``module(x)``, or x where the module :func:`passes_through`."""
    return x if passes_through(module) else module(x)


def output_may_fuse(module, cls) -> bool:
    """Whether ``module``'s output may stay inside a fusion with what follows (z_0 with its tables, a block's
    output as an unevaluated sum, the final norm with the last residual add): only when it runs unmodified, and not
    under torch.fx, where these outputs must be nodes of their own (feature extraction asks for them by name)."""
    return runs_unmodified(module, cls) and not fx_tracing()


def linear(module, x):
    """``module(x)`` for a Linear layer, by ``ops.linear`` on its parameters where that may differ from F.linear
    (in fp32 on a CPU that emulates its bf16 / fp16 GEMM), the module is an unmodified nn.Linear, and not under
    torch.fx (a module call is a node of its own there, and ``x`` a proxy)."""
    if fx_tracing() or ops.linear_is_plain(x) or not runs_unmodified(module, nn.Linear):
        return module(x)
    return ops.linear(x, *weight_and_bias(module))


def fusable_layer_norm(norm) -> bool:
    """An unmodified affine nn.LayerNorm over the last dim, which the fused residual add + LayerNorm can replace."""
    if not runs_unmodified(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        return False
    weight, bias = weight_and_bias(norm)
    return weight is not None and bias is not None


_HALF = (torch.float16, torch.bfloat16)


def layer_norm(norm, h, residual, backend):
    """(norm(h + residual), h + residual), residual None meaning 0: fused when ``norm`` is a plain LayerNorm whose
    output may fuse (not under torch.fx: see ``output_may_fuse``). Under autocast the output is fp32, as CUDA's
    autocast runs a LayerNorm (so what CPU runs measure speaks for the GPU); CPU's autocast keeps a 16-bit LayerNorm
    in 16 bits, so a model cast to 16 bits keeps its dtype there: the features a user gets have timm's dtype."""
    if fusable_layer_norm(norm) and not fx_tracing():
        device = h.device.type
        if h.dtype in _HALF and autocast_enabled(device) and \
                not (device == "cpu" and norm._parameters["weight"].dtype in _HALF):
            # the output takes the first operand's dtype: the fp32 one goes first (the same sum)
            if residual is not None and residual.dtype not in _HALF:
                h, residual = residual, h
            else:
                h = h.float()
        return ops.add_layer_norm(h, residual, *weight_and_bias(norm), norm.eps, backend=backend)
    z = h if residual is None else h + residual
    return norm(z), z
