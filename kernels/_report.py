"""Ahead-of-time compile specs: how each kernel module tells bench/kernel_report.py what to compile.

The report compiles every Triton kernel for sm_80 and sm_90 without a GPU and reads its registers, spills and
shared memory, at the shapes of real models. A kernel module joins by exposing one function::

    def aot_specs(shape: ModelShape, dtype: str) -> list[KernelSpec]:
        ...

- ``shape`` is one of :data:`MODELS` (ViT-B/16, L/16, H/14): ``dim``, ``mlp_dim``, ``tokens``, ``heads``,
  ``head_dim``, ``patch``, ``in_chans``, ``img_size``.
- ``dtype`` is the activation dtype as Triton spells it, ``"fp16"`` or ``"bf16"`` (:data:`DTYPES`);
  ``TORCH_DTYPES[dtype]`` is the torch dtype.
- Each :class:`KernelSpec` names a ``@triton.jit`` function, its full ``signature`` (every parameter, in order:
  ``"*fp16"``/``"*bf16"``/``"*fp32"`` pointers, ``"i32"``/``"i64"``/``"fp32"`` scalars, ``"constexpr"`` for
  constexpr parameters), ``constexprs`` (a value for every constexpr parameter) and the launch options
  ``num_warps`` / ``num_stages``; ``aligned`` names the parameters that are multiples of 16 at launch (pointers
  from torch's allocator, widths like 768), which Triton's JIT would specialise on too; ``archs`` the compute
  capabilities it runs on (a TMA kernel: ``(90,)``), the report compiling it for those only. A TMA descriptor
  parameter is ``"tensordesc<bf16[128, 64]>"`` (dtype and block shape).

The block sizes, warps and stages in a spec must come from the SAME function the launcher calls to pick them
(e.g. ``layer_norm._config(dim)``), so that what the report checks is what runs. Specs cover every variant a model
launches (one spec per distinct set of constexprs / pointer dtypes), and ``label`` says which (e.g. "D=768");
:func:`spec_from_launch` builds a spec from a launch's arguments, specialised as Triton's JIT would, and
tests/test_kernel_report.py checks every launch of a model against the specs with Triton's own binder. Sizes that
depend on the batch are those of :data:`AOT_IMAGES` images, with :data:`AOT_PROGRAMS` programs for the row-wise
backward kernels.

The report (``python bench/kernel_report.py``) gathers ``aot_specs`` from every ``kernels/*.py`` module that has
one, so nothing else needs registering.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import pathlib
import re
import subprocess
import tempfile

import torch


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes of one ViT that decide kernel shapes."""
    name: str
    dim: int
    mlp_dim: int
    tokens: int
    heads: int
    head_dim: int
    patch: int
    img_size: int = 224
    in_chans: int = 3


MODELS = {
    "vit_base_patch16_224": ModelShape("vit_base_patch16_224", 768, 3072, 197, 12, 64, 16),
    "vit_large_patch16_224": ModelShape("vit_large_patch16_224", 1024, 4096, 197, 16, 64, 16),
    "vit_huge_patch14_224": ModelShape("vit_huge_patch14_224", 1280, 5120, 257, 16, 80, 14),
}

DTYPES = ("fp16", "bf16")
# Batch of the launches the specs describe (3: no row count of ViT-B/L/H is a multiple of 16, as in most
# batches), and the programs of a row-wise backward kernel (``_launch.row_programs`` with 4 SMs, as for CPU tensors):
# every count per program is then above 1 and not a multiple of 16, as in a training step.
AOT_IMAGES = 3
AOT_PROGRAMS = 16
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Most dynamic shared memory one block may use, bytes (CUDA programming guide, compute capabilities table).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel variant to compile ahead of time; see the module docstring."""
    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 1
    label: str = ""
    aligned: tuple = ()
    archs: tuple = (80, 90)  # the GPUs (compute capabilities in SMEM_LIMIT) it runs on


def spec_from_launch(name, fn, args, constexprs, num_warps, num_stages, label):
    """KernelSpec for ``fn`` launched with ``args`` (parameter -> "*dtype" pointer, int or float value),
    specialised as Triton's JIT specialises that launch: an int equal to 1 becomes the constexpr 1, an int
    divisible by 16 is aligned, floats are fp32 and never specialised, and every pointer is aligned (torch's
    allocations are, and views start at multiples of 16 bytes in the launches described)."""
    signature, consts, aligned = {}, dict(constexprs), []
    for param in fn.arg_names:
        if param in constexprs:
            signature[param] = "constexpr"
            continue
        value = args[param]
        if isinstance(value, str):
            signature[param] = value
            aligned.append(param)
        elif isinstance(value, float):
            signature[param] = "fp32"
        elif value == 1:
            signature[param] = "constexpr"
            consts[param] = 1
        else:
            signature[param] = "i32"
            if value % 16 == 0:
                aligned.append(param)
    return KernelSpec(name, fn, signature, consts, num_warps, num_stages, label, tuple(aligned))


def kernel_modules():
    """Names of the modules in kernels/ (fastvit.kernels) that list their launches (``aot_specs``); not private ones
    like this file, nor ``matmul``, whose GEMM the fused-matmul modules list with their prologues and epilogues."""
    here = pathlib.Path(__file__).parent
    names = sorted(p.stem for p in here.glob("*.py") if not p.stem.startswith("_"))
    return [n for n in names if hasattr(importlib.import_module(f"fastvit.kernels.{n}"), "aot_specs")]


def collect_specs(shape, dtype, modules=None):
    """(module, spec) for every spec every kernel module (or those in ``modules``) exposes for shape/dtype."""
    out = []
    for name in modules or kernel_modules():
        mod = importlib.import_module(f"fastvit.kernels.{name}")
        specs = getattr(mod, "aot_specs", None)
        if specs is not None:
            out.extend((name, s) for s in specs(shape, dtype))
    return out


def cuobjdump_path():
    import triton
    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def tensor_core_instructions(ptx: str) -> str:
    """Which tensor-core MMA a kernel's PTX issues: "wgmma" (Hopper's asynchronous warpgroup MMA), "mma.sync" (the
    per-warp MMA of Ampere, which Hopper runs at a fraction of its peak), both joined by "+", or "none" (no
    tl.dot, or fp32 dots computed without tensor cores)."""
    found = [name for name, pattern in (("wgmma", r"\bwgmma\.mma_async"), ("mma.sync", r"\bmma\.sync"))
             if re.search(pattern, ptx)]
    return "+".join(found) or "none"


_C7515 = re.compile(r"\(C7515\).*?serialized(?: due to (.*?))?(?: in the function|$)", re.MULTILINE)


def serialization_reason(ptxas_log: str):
    """ptxas's reason for serialising a kernel's wgmma, from its note C7515 in ``ptxas_log`` (e.g. "non wgmma
    instructions defining accumulator registers of a wgmma between start and end of the pipeline stage"); "" for a
    note without one; None when there is no such note."""
    m = _C7515.search(ptxas_log)
    return None if m is None else (m.group(1) or "")


def compile_spec(spec, arch):
    """Compile ``spec`` for sm_``arch`` and return its resource use (registers, stack, local, shared bytes),
    tensor-core instructions (:func:`tensor_core_instructions`) and whether ptxas serialised its wgmma
    (``wgmma_serialized``: its C7515 note, each wgmma then waits for the one before; ``wgmma_serialized_reason``:
    :func:`serialization_reason`). ``ok``: no spills, shared memory within one block's limit, and on sm_90 no
    mma.sync (a tile too small for wgmma leaves most of Hopper's tensor cores idle)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(spec.signature)
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in spec.aligned}
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    # ptxas's notes reach us only through Triton's log dump, and only when it runs: no cache hit
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(io.StringIO()) as log:
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        dump = subprocess.run([str(cuobjdump_path()), "--dump-resource-usage", cubin],
                              capture_output=True, text=True, check=True).stdout
    m = _RESOURCE.search(dump)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for {spec.name}:\n{dump}")
    reg, stack, static_smem, local = map(int, m.groups())
    # Triton allocates shared memory dynamically; metadata.shared is the bytes it asks for at launch.
    shared = static_smem + int(kernel.metadata.shared)
    mma = tensor_core_instructions(kernel.asm["ptx"])
    reason = serialization_reason(log.getvalue())
    return {"registers": reg, "stack": stack, "local": local, "shared": shared,
            "shared_limit": SMEM_LIMIT[arch], "mma": mma, "wgmma_serialized": reason is not None,
            "wgmma_serialized_reason": reason,
            "ok": stack == 0 and local == 0 and shared <= SMEM_LIMIT[arch] and not (arch >= 90 and "mma.sync" in mma)}
