"""`pip install .` and `pip install -e .` both give fastvit.kernels and never a top-level `kernels` module, and ship
the pretrained configs (package data). A top-level `kernels` may still be importable: Hugging Face's package of that
name, which transformers (a test dependency) requires in 5.25; it must be theirs, found outside what the install
wrote."""
import pathlib
import shutil
import site
import subprocess
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECK = (
    "import importlib.metadata, importlib.util, sysconfig, sys;"
    "import fastvit, fastvit.kernels, fastvit.kernels.layer_norm, fastvit.data.shards;"
    "spec = importlib.util.find_spec('kernels');"
    "ours = (sysconfig.get_paths()['purelib'], sys.argv[1]);"  # where this install wrote, and the source tree
    "assert spec is None or not str(spec.origin).startswith(ours),"
    " f'a top-level kernels module is installed: {spec}';"
    # an editable install's finder comes after the path's: its own listing of top-level names says what it maps
    "top = (importlib.metadata.distribution('fastvit').read_text('top_level.txt') or '').split();"
    "assert 'kernels' not in top, f'fastvit installs the top-level names {top}';"
    "assert 'vit_base_patch16_224.augreg_in21k' in fastvit.list_pretrained(), 'pretrained_cfgs.json is missing';"
    "print(fastvit.kernels.__file__)"
)


@pytest.fixture(scope="module")
def scratch_env(tmp_path_factory):
    """A fresh venv that sees this environment's torch (through a .pth line) but not its fastvit install."""
    root = tmp_path_factory.mktemp("pkg")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    purelib = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                      text=True).strip()
    deps = [p for p in site.getsitepackages() if "site-packages" in p]
    pathlib.Path(purelib, "parent_env.pth").write_text("\n".join(deps) + "\n")
    src = root / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.egg-info", "build",
                                                             "results", ".pytest_cache", "tests", "bench"))
    return python, src, root


def run(python, *args, cwd):
    proc = subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_install_gives_fastvit_kernels_only(scratch_env, editable):
    python, src, root = scratch_env
    run(python, "-m", "pip", "uninstall", "-y", "-q", "fastvit", cwd=root)
    run(python, "-m", "pip", "install", "-q", "--no-deps", *(["-e"] if editable else []),
        str(src), cwd=root)
    location = pathlib.Path(run(python, "-c", CHECK, str(src), cwd=root).strip())
    if editable:
        assert location == src / "kernels" / "__init__.py"
    else:
        assert location.parts[-4:] == ("site-packages", "fastvit", "kernels", "__init__.py")
        assert not (location.parents[2] / "kernels").exists()


# from the checkout's root the working directory is first on sys.path, and its kernels/ folder with it
FROM_ROOT = ("import sys, kernels; print(kernels.__file__);"
             "assert sys.modules['kernels'] is kernels and kernels.__name__ == 'kernels'")


def test_kernels_from_the_checkout_root_is_hugging_faces_package():
    """``python -m pytest`` or ``python -m fastvit.train`` run in the checkout: ``import kernels`` (transformers'
    hub kernels) gets Hugging Face's package, not our folder, and without it fails as a missing module does."""
    import sys
    installed = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=ROOT.parent,
                               capture_output=True, text=True)
    proc = subprocess.run([sys.executable, "-c", FROM_ROOT], cwd=ROOT, capture_output=True, text=True)
    if installed.returncode == 0:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip() == installed.stdout.strip()
    else:
        assert "ModuleNotFoundError: No module named 'kernels'" in proc.stderr, proc.stderr[-3000:]
    # without any other copy on the path: a missing module, which find-based checks treat as absent
    hidden = subprocess.run([sys.executable, "-c", "import sys; sys.path[:] = [p for p in sys.path if "
                             "'-packages' not in p]; import kernels"], cwd=ROOT, capture_output=True, text=True)
    assert "ModuleNotFoundError: No module named 'kernels' (this folder is fastvit's" in hidden.stderr, \
        hidden.stderr[-3000:]


def test_ci_runs_exactly_the_readme_commands():
    """.ci/run must install and test exactly as the README's set-up block says."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.strip() for line in block.strip().splitlines()]
    assert commands[0].startswith("pip install -e") and commands[-1].startswith("pytest")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command in ci_lines, f"{command!r} from README.md is not run by .ci/run"
    assert ci_lines[-1] == commands[-1], ".ci/run must end with the README's test command"
