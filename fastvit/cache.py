"""fastvit's cache folder, one for everything a run keeps between processes (autotune winners, shard indexes of
read-only datasets): ``$FASTVIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastvit``, else ``~/.cache/fastvit``."""
import os
import pathlib
import warnings


def cache_dir() -> pathlib.Path:
    """The cache folder, read from the environment at each call (a test or a job may set it late).
    ``$FASTVIT_CACHE``, which named the shard indexes' folder for a while, is taken with a warning."""
    root = os.environ.get("FASTVIT_CACHE_DIR")
    if not root and os.environ.get("FASTVIT_CACHE"):
        warnings.warn("FASTVIT_CACHE is now FASTVIT_CACHE_DIR (one cache folder for the shard indexes and the "
                      "autotune file): set that instead", FutureWarning, stacklevel=2)
        root = os.environ["FASTVIT_CACHE"]
    if root:
        return pathlib.Path(root)
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "fastvit"
