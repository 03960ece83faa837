"""Tests under tests/interpret/ need TRITON_INTERPRET=1 set before triton is imported, so they run in their
own process (tests/test_interpret.py starts one per file) and are skipped by a plain collection."""
import os

collect_ignore_glob = [] if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else ["interpret/*"]
