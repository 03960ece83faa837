"""Run timm's own generic model tests against fastvit's models: the drop-in check.

    python bench/timm_suite.py PATH/TO/pytorch-image-models/tests/test_models.py \
        [--names 'vit_tiny*,vit_small*,vit_base*'] [-k EXPR] [--out results/timm_suite.json]

timm's test file runs unchanged. A ``conftest.py`` written next to a copy of it makes timm's model-zoo entry points
(``create_model``, ``list_models``, ``list_pretrained``, ``get_pretrained_cfg_value``) answer with fastvit's, limited
to the names matching ``--names`` (large and huge models take minutes each on a CPU), before the test file imports
them; everything else the tests use (``FeatureInfo``, the FX tracer settings, torchvision) stays timm's and
torchvision's. The default ``-k`` selects the tests the drop-in issue names (forward, backward, default configs,
forward_intermediates, features, FX); TorchScript and the tests that download pretrained weights are left out.
Writes a JSON summary (passed / failed / skipped per test function, and each failure's message).
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the standard library: see common.py
import common  # noqa: E402

DEFAULT_K = ("test_model_forward or test_model_backward or test_model_default_cfgs or "
             "test_model_forward_intermediates or test_model_forward_features or test_model_forward_fx or "
             "test_model_backward_fx")
EXCLUDE_K = "not torchscript and not pretrained and not inference"

CONFTEST = '''"""Written by fastvit's bench/timm_suite.py: timm's model-zoo entry points answer with fastvit's."""
import fnmatch
import os

import timm
import timm.models

import fastvit

PATTERNS = os.environ["FASTVIT_TIMM_SUITE_NAMES"].split(",")


def _ours(names):
    return [n for n in names if any(fnmatch.fnmatch(n.split(".")[0], p) for p in PATTERNS)]


def list_models(*args, **kwargs):
    return _ours(fastvit.list_models(*args, **kwargs))


def list_pretrained(*args, **kwargs):
    return _ours(fastvit.list_pretrained(*args, **kwargs))


for module in (timm, timm.models):
    module.create_model = fastvit.create_model
    module.list_models = list_models
    module.list_pretrained = list_pretrained
    module.get_pretrained_cfg_value = fastvit.get_pretrained_cfg_value
'''


def run(test_file, names, k, workdir):
    """pytest on a copy of ``test_file`` beside the conftest; returns (exit code, junit XML path)."""
    shutil.copy(test_file, workdir / "test_models.py")
    (workdir / "conftest.py").write_text(CONFTEST)
    junit = workdir / "junit.xml"
    env = dict(os.environ, FASTVIT_TIMM_SUITE_NAMES=names)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore",
           "-k", f"({k}) and {EXCLUDE_K}", f"--junitxml={junit}", "--rootdir", str(workdir),
           str(workdir / "test_models.py")]
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=workdir, env=env).returncode, junit


def summarise(junit):
    """{test function: {"passed", "failed", "skipped"}} and the failures' first lines, from pytest's junit XML."""
    counts = collections.defaultdict(lambda: collections.Counter(passed=0, failed=0, skipped=0))
    failures = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        fn = case.get("name").split("[")[0]
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                failures[case.get("name")] = (child.get("message") or "").splitlines()[0][:300]
            elif child.tag == "skipped":
                outcome = "skipped"
        counts[fn][outcome] += 1
    return {fn: dict(c) for fn, c in sorted(counts.items())}, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("test_file", type=pathlib.Path, help="timm's tests/test_models.py")
    parser.add_argument("--names", default="vit_tiny*,vit_small*,vit_base*",
                        help="comma-separated patterns of fastvit architectures to test")
    parser.add_argument("-k", default=DEFAULT_K, help="pytest -k expression selecting timm's tests")
    parser.add_argument("--out", default="results", help="folder for timm_suite.json")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    if not args.test_file.is_file():
        parser.error(f"{args.test_file} is not a file (timm's tests/test_models.py)")
    out = common.out_dir(args.out, parser)
    with tempfile.TemporaryDirectory(prefix="fastvit-timm-suite-") as tmp:
        code, junit = run(args.test_file, args.names, args.k, pathlib.Path(tmp))
        if not junit.exists():
            raise SystemExit(f"pytest wrote no results (exit {code})")
        per_test, failures = summarise(junit)
    totals = collections.Counter()
    for c in per_test.values():
        totals.update(c)
    print(common.markdown_table(["test", "passed", "failed", "skipped"],
                                [[fn, c["passed"], c["failed"], c["skipped"]] for fn, c in per_test.items()]))
    print(f"\n{totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
    for name, msg in failures.items():
        print(f"FAILED {name}: {msg}")
    common.write_result(out / "timm_suite.json",
                        dict(names=args.names, k=args.k, totals=dict(totals), tests=per_test, failures=failures),
                        args, t_start)
    return 1 if totals["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
