"""Tests under tests/interpret/ need TRITON_INTERPRET=1 set before triton is imported, so they run in their
own process (tests/test_interpret.py starts one per file) and are skipped by a plain collection.

tests/ goes on sys.path so that test files here and in tests/interpret/ import the shared ``_helpers`` (pytest
would add only each test file's own folder)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

collect_ignore_glob = [] if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else ["interpret/*"]
