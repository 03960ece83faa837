"""fastvit's cache folder, one for everything a run keeps between processes (autotune winners, shard indexes of
read-only datasets): ``$FASTVIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastvit``, else ``~/.cache/fastvit``."""
import os
import pathlib


def cache_dir() -> pathlib.Path:
    """The cache folder, read from the environment at each call (a test or a job may set it late)."""
    root = os.environ.get("FASTVIT_CACHE_DIR")
    if root:
        return pathlib.Path(root)
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "fastvit"
