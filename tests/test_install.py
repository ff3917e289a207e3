"""`pip install .` and `pip install git+URL`: the wheel holds one import name
(``switchable_norm``, the repository's normalization/ folder) and nothing generic; it
works installed apart from the checkout, from a project that has its own ``models``,
``data`` and ``normalization`` packages; an in-tree build leaves only git-ignored files.

Real pip and setuptools (``--no-build-isolation``: the environment's setuptools, no
network), a copy of the checkout committed to a scratch git repository (a clean clone)
so the checkout itself is never written to. Installs go to a ``--target`` folder that the
test's interpreter (with its torch) sees through PYTHONPATH only.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.packaging

GENERIC = {"models", "data", "engine", "analysis", "tools", "configs", "normalization",
           "scripts", "tests"}
_IGNORE = shutil.ignore_patterns(".git", ".venv", "runs", "outputs", "build", "*.egg-info",
                                 "__pycache__", ".pytest_cache", ".cache", ".whl", ".gl")


def _run(cmd, cwd, **env):
    full = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", **env}
    proc = subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc.stdout


def _git(cwd, *args):
    return _run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com",
                 "-c", "commit.gpgsign=false", *args], cwd)


def _pip(cwd, *args):
    return _run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-build-isolation",
                 "--no-index"], cwd)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The checkout's files, committed to a fresh repository: what a clean clone holds."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    pytest.importorskip("setuptools", minversion="64", reason="requirements.txt installs it")
    src = tmp_path_factory.mktemp("pkg") / "clone"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    _git(src, "init", "-q")
    _git(src, "add", "-A")
    _git(src, "commit", "-q", "-m", "snapshot")
    return src


@pytest.fixture(scope="module")
def wheel(clone, tmp_path_factory):
    """`pip wheel git+file://...`: pip clones the repository and builds from the clone."""
    out = tmp_path_factory.mktemp("wheels")
    _pip(out, "wheel", "-q", "-w", str(out), f"git+file://{clone}")
    (path,) = out.glob("switchable_norm-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(clone, tmp_path_factory):
    """`pip install .` inside the clone (an in-tree build), into a folder of its own."""
    site = tmp_path_factory.mktemp("site")
    _pip(clone, "install", "-q", "--target", str(site), ".")
    return site


def _requirement_tools():
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:  # pip always carries a copy
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import canonicalize_name
    return Requirement, canonicalize_name


def test_wheel_holds_one_import_name_and_declares_ranges_of_the_pins(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(f"{info}/METADATA").decode()
        top_level = z.read(f"{info}/top_level.txt").decode().split()
    assert {n.split("/")[0] for n in names} == {"switchable_norm", info}
    assert top_level == ["switchable_norm"]
    assert not GENERIC & {n.split("/")[0] for n in names}
    assert "switchable_norm/switchable.py" in names and "switchable_norm/ops.py" in names
    assert not any(n.endswith((".yaml", ".sh")) or "/tests/" in n for n in names)

    sys.path.insert(0, ROOT)  # the version comes from normalization/__init__.py
    try:
        import normalization
    finally:
        sys.path.remove(ROOT)
    assert f"\nVersion: {normalization.__version__}\n" in metadata

    # every declared dependency (extras included) admits the pin of requirements.txt
    Requirement, canonical = _requirement_tools()
    pins = {}
    for line in open(os.path.join(ROOT, "requirements.txt")):
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version
    declared = [Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    assert {canonical(r.name) for r in declared} >= {"torch", "timm", "tensorboard",
                                                      "matplotlib", "nvidia-dali-cuda130"}
    for req in declared:
        assert canonical(req.name) in pins, f"{req.name} is not pinned in requirements.txt"
        assert req.specifier.contains(pins[canonical(req.name)]), (str(req), pins)
    core = [r for r in declared if r.marker is None]
    assert [canonical(r.name) for r in core] == ["torch"]  # the library needs torch only


def test_in_tree_build_leaves_only_ignored_files(clone, installed):
    assert sorted(os.listdir(installed)) == ["switchable_norm",
                                             next(n for n in os.listdir(installed)
                                                  if n.endswith(".dist-info"))]
    assert (clone / "build").is_dir()  # pip builds in the tree, as `pip install .` does
    assert _git(clone, "status", "--porcelain", "--untracked-files=all") == ""
    # nothing in build/ is collected or imported as a top-level name of the clone
    assert not list((clone / "build").rglob("test_*.py"))
    assert not list((clone / "build").rglob("conftest.py"))


USER_SCRIPT = '''
import json, os, sys
import switchable_norm as sn          # installed
import data, models                   # the project's own, same names as the repository's
import torch
import torch.nn as nn

net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                    nn.BatchNorm2d(8))
net = sn.convert_norm(net, "sn")
y = net(torch.randn(4, 3, 10, 10))
layer = sn.build_norm("sn", 16)
here = os.path.dirname(os.path.abspath(__file__))
print(json.dumps({
    "sn_file": sn.__file__, "models": models.ORIGIN, "data": data.ORIGIN,
    "models_file": models.__file__,
    "user_normalization_imported": "normalization" in sys.modules,
    "converted": [type(m).__name__ for m in net if not isinstance(m, (nn.Conv2d, nn.ReLU))],
    "finite": bool(torch.isfinite(y).all()), "shape": list(y.shape),
    "layer": type(layer).__name__, "ratios": sorted(sn.ratios(net)),
    "version": sn.__version__,
    "from_site": sorted({m.split(".")[0] for m, mod in sys.modules.items()
                         if getattr(mod, "__file__", None)
                         and os.path.abspath(mod.__file__).startswith(os.environ["SITE"])}),
}))
'''


def test_installed_library_in_a_project_with_its_own_models_and_data(installed, tmp_path):
    project = tmp_path / "project"
    for name in ("models", "data", "normalization"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f'ORIGIN = "user {name}"\n')
    (project / "main.py").write_text(USER_SCRIPT)
    env = {"PYTHONPATH": str(installed), "SITE": str(installed), "OMP_NUM_THREADS": "1"}
    out = json.loads(_run([sys.executable, "main.py"], project, **env).splitlines()[-1])
    assert out["sn_file"].startswith(str(installed))
    assert not out["sn_file"].startswith(ROOT)
    assert out["models"] == "user models" and out["data"] == "user data"
    assert out["models_file"] == str(project / "models" / "__init__.py")
    assert out["user_normalization_imported"] is False  # the library imports itself only
    assert out["from_site"] == ["switchable_norm"]
    assert out["converted"] == ["SwitchNorm2d", "SwitchNorm2d"]
    assert out["finite"] and out["shape"] == [4, 8, 6, 6]
    assert out["layer"] == "SwitchNorm2d" and out["ratios"] == ["1", "4"]
