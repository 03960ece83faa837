"""Runs each file of tests/interpret/ in a fresh pytest process with TRITON_INTERPRET=1."""
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
FILES = sorted(p.name for p in (HERE / "interpret").glob("test_*.py"))


@pytest.mark.parametrize("name", FILES)
def test_interpreted(name):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "interpret" / name)],
        env=env, capture_output=True, text=True, timeout=600,  # a hang fails this file, not the whole CI budget
    )
    print(proc.stdout[-20000:], proc.stderr[-5000:])
    # exit 5 means no test ran, which is a failure too
    assert proc.returncode == 0, f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
