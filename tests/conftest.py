"""Tests under tests/interpret/ need TRITON_INTERPRET=1 set before triton is imported, so they run in their
own process (tests/test_interpret.py starts one per file) and are skipped by a plain collection.

tests/ goes on sys.path so that test files here and in tests/interpret/ import the shared ``_helpers`` (pytest
would add only each test file's own folder).

No test reaches the Hugging Face Hub or reads the machine's HF cache: offline mode and an empty cache folder are set
before huggingface_hub is first imported (it reads both once); tests that need cached files build their own. Choices
that fastvit.autotune measures go to a temporary folder too, never to the user's ~/.cache/fastvit.

Each test starts and ends with empty launch caches (``fastvit.kernels._launch.forget``): the launchers' plans hold
the kernels they launched, which tests replace by recorders."""
import atexit
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="fastvit-tests-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], True)
os.environ["FASTVIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastvit-tests-cache-")
atexit.register(shutil.rmtree, os.environ["FASTVIT_CACHE_DIR"], True)

collect_ignore_glob = [] if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else ["interpret/*"]


@pytest.fixture(autouse=True)
def _fresh_launch_caches():
    """Launch plans made by one test (with its patched kernels or launches) are not taken by the next."""
    _forget_launches()
    yield
    _forget_launches()


def _forget_launches():
    launch = sys.modules.get("fastvit.kernels._launch")  # never imported here: triton reads TRITON_INTERPRET once
    if launch is not None:
        launch.forget()
