"""Fused ops, one file each: Triton forward and backward kernels, their launcher, and the torch reference.

Installed as ``fastvit.kernels`` (never as a top-level ``kernels`` module).
"""
if __name__ == "kernels":
    # Imported by that name from a checkout's root (``python -m pytest``, ``python -m fastvit.train``: the working
    # directory comes first on sys.path), where this folder would shadow Hugging Face's PyPI package ``kernels``,
    # which transformers imports when it is installed: hand the name over to that package, or be absent.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (this folder is fastvit's: import fastvit.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
