"""The README's test command, run a second time, must still find every package.

Issue 34: with `wheel` installed (TensorFlow brings it) and no
pyproject.toml, an older setuptools took the legacy `setup.py develop` path,
which ignores setup.py's package mapping: rsjax.configs, rsjax.launch and
rsjax.tfds_builder stopped importing. These tests install the checkout into a
fresh venv that already has `wheel` and setuptools 65.5 (the state of a
developer's machine after the first run), editable and not, and look up every
rsjax package there. They need the package index, as the README's install does.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package lives in the checkout (setup.py's PACKAGE_DIRS).
MAPPED = {"rsjax.configs": "configs", "rsjax.launch": "launch", "rsjax.tfds_builder": "tfds_builder"}


def checkout_packages() -> list[str]:
    """Every package an install must provide, found from the checkout's folders
    (independently of setup.py's own listing)."""
    names = []
    for prefix, folder in [("rsjax", "rsjax"), *MAPPED.items()]:
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            parts = init.parent.relative_to(ROOT / folder).parts
            names.append(".".join((prefix, *parts)))
    return names


def _source_copy(dest: Path) -> Path:
    """The checkout's files, less what git ignores (so a build leaves nothing in it)."""
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:       # not a git checkout: copy the folders
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", "work", "*.egg-info"))
        return dest
    for name in tracked.stdout.splitlines():
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def old_setuptools_venv(tmp_path_factory) -> Path:
    """A venv with setuptools 65.5 and wheel: the legacy editable path's trigger."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    _pip(python, "install", "-q", "setuptools==65.5.0", "wheel")
    return python


def _pip(python: Path, *args: str, cwd=None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    done = subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


LOOK_UP = """
import importlib.util, json, sys
found = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    found[name] = spec.origin if spec else None
print(json.dumps(found))
"""


def _found(python: Path, names: list[str], cwd: Path) -> dict:
    import json

    done = subprocess.run([str(python), "-I", "-c", LOOK_UP, *names], capture_output=True,
                          text=True, cwd=cwd, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_checkout_lists_the_packages_setup_installs():
    # A control on checkout_packages: the mapped packages and a nested one are there.
    names = checkout_packages()
    assert {"rsjax", "rsjax.data", "rsjax.configs", "rsjax.launch", "rsjax.tfds_builder",
            "rsjax.tfds_builder.rs_multisource"} <= set(names)


@pytest.mark.parametrize("editable", [True, False], ids=["editable", "wheel"])
def test_an_install_beside_wheel_and_old_setuptools_provides_every_package(
        old_setuptools_venv, tmp_path, editable):
    source = _source_copy(tmp_path / "src")
    log = _pip(old_setuptools_venv, "install", "--no-deps", *(["-e"] if editable else []),
               str(source), "-v")
    # The legacy path is the bug: it must not be taken.
    assert "setup.py develop" not in log
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = _found(old_setuptools_venv, checkout_packages(), cwd=elsewhere)
    missing = [name for name, origin in found.items() if origin is None]
    assert not missing, f"not importable after pip install {'-e ' if editable else ''}.: {missing}"
    if editable:   # the edits a developer makes are the code that runs
        assert found["rsjax.tfds_builder"].startswith(str(source / "tfds_builder"))
    else:
        assert "site-packages" in found["rsjax.configs"]
    version = subprocess.run([str(old_setuptools_venv), "-I", "-c",
                              "import importlib.metadata as m; print(m.version('rsjax'))"],
                             capture_output=True, text=True, cwd=elsewhere)
    assert version.stdout.strip() and version.stdout.strip() != "0+unknown"


def test_a_hung_test_fails_within_the_suites_timeout(tmp_path):
    """pytest.ini gives every test a timeout (pytest-timeout): a hang fails
    the run in minutes. Here a sleeping test under the suite's own ini, with
    the timeout lowered to 2 s, must fail by timeout, not run its 300 s."""
    import configparser
    import time

    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    assert int(ini["pytest"]["timeout"]) > 0
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_sleeps():\n    time.sleep(300)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pytest.ini"),
                           "--rootdir", str(tmp_path), "-n", "0", "-p", "no:cacheprovider",
                           "-o", "timeout=2", str(tmp_path / "test_hang.py")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "Timeout" in done.stdout and "1 failed" in done.stdout
    assert time.monotonic() - started < 60
