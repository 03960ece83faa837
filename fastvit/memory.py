"""Count the activation bytes a training forward keeps for backward, the figure the block design is judged by.

Counting hooks into ``torch.autograd.graph.saved_tensors_hooks``, so it sees exactly what autograd keeps (on any
device, through fastvit's torch fallbacks or its kernels' autograd Functions). Each storage is counted once, however
many saved tensors view it, and parameters (plus the copies autocast makes of them, e.g. bf16 weights) are kept
apart: they are weights, paid once per model, not per image.
"""
from __future__ import annotations

import torch

__all__ = ["SavedTensorCounter", "saved_activation_bytes"]

# Autograd nodes that only reinterpret or cast a tensor: a saved tensor reached from a parameter through these
# alone is that parameter's data (e.g. autocast's bf16 copy of a weight, or its transpose), not an activation.
_WEIGHT_VIEW_NODES = {"ToCopyBackward0", "TBackward0", "ViewBackward0", "PermuteBackward0", "TransposeBackward0",
                      "ExpandBackward0", "UnsafeViewBackward0", "AliasBackward0", "ReshapeAliasBackward0"}


def _derived_from(t, param_ids):
    """Whether ``t`` is a parameter, or a cast/view of exactly one, per its autograd history."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _WEIGHT_VIEW_NODES:
        nxt = [f for f, _ in fn.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        fn = nxt[0]
    return fn is not None and type(fn).__name__ == "AccumulateGrad" and id(fn.variable) in param_ids


class SavedTensorCounter:
    """Context manager that records every unique storage autograd saves for backward while it is active.

    Storages of ``params`` (and tensors derived from them by casts/views only, such as autocast's low-precision
    weight copies) are kept apart in :attr:`weight_bytes`; :attr:`activation_bytes` is everything else.
    The saved tensors stay alive with the graph, so storage addresses are not reused while counting.
    :attr:`saved` lists every pack (nbytes of the tensor's storage, whether it is weight data) without
    deduplication, for comparing counting conventions.
    """

    def __init__(self, params=()):
        params = list(params)
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self._param_ids = {id(p) for p in params}
        self.storages = {}  # data_ptr -> (nbytes, is_weight)
        self.saved = []     # (nbytes, is_weight) per saved tensor, duplicates included
        self._hooks = None

    def _pack(self, t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in self.storages:
            self.storages[ptr] = (s.nbytes(), ptr in self._param_ptrs or _derived_from(t, self._param_ids))
        self.saved.append(self.storages[ptr])
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def activation_bytes(self):
        return sum(n for n, weight in self.storages.values() if not weight)

    @property
    def weight_bytes(self):
        """Bytes of saved parameter storages that are not the parameters themselves (e.g. autocast copies)."""
        return sum(n for ptr, (n, weight) in self.storages.items() if weight and ptr not in self._param_ptrs)


def saved_activation_bytes(model, x, dtype=torch.bfloat16, details=False):
    """Bytes autograd saves for one training forward of ``model`` on ``x``, parameters and their cast copies
    excluded, each storage once.

    ``dtype`` is the autocast dtype (None: no autocast, the parameters' dtype). With ``details`` the result is the
    :class:`SavedTensorCounter` itself (weight copies, per-pack list) instead of the byte count. The model is left
    in training mode.
    """
    model.train()
    with SavedTensorCounter(model.parameters()) as counter:
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x.detach())
    del out
    return counter if details else counter.activation_bytes
