"""Shared pytest setup.

Tests run on 8 fake CPU devices so that data parallelism is exercised for real;
the flag must be set before JAX is imported anywhere. A device count the user
set in XLA_FLAGS is kept (tests needing 8 devices then skip, saying so). Tests compile many small
programs and run each a few steps, so XLA's backend optimizations are turned
down and its older loop emitters used (compiles about twice as fast, runs
slower: the right trade for tests).
"""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Each flag is added unless XLA_FLAGS already sets it: flags a user exported
# for other reasons must not cost the tests their 8 devices.
TEST_XLA_FLAGS = {"--xla_force_host_platform_device_count": "8",
                  "--xla_backend_optimization_level": "0",
                  "--xla_llvm_disable_expensive_passes": "true",
                  # XLA:CPU's older loop emitters: a tiny train step compiles in
                  # 2.0-4.7 s instead of 3.1-7.5 s (pix2pix, flow, RS-SPADE;
                  # 2-core AMD EPYC, jax 0.10.2).
                  "--xla_cpu_use_fusion_emitters": "false"}


def with_test_xla_flags(preset: str) -> str:
    """`preset` (an XLA_FLAGS value) with every flag of TEST_XLA_FLAGS it does not set."""
    flags = preset.split()
    named = {flag.split("=", 1)[0] for flag in flags}
    flags += [f"{name}={value}" for name, value in TEST_XLA_FLAGS.items() if name not in named]
    return " ".join(flags)


os.environ["XLA_FLAGS"] = with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Commands the tests run in-process (rsjax.cli.main) turn on JAX's persistent
# compilation cache (by default ~/.cache/rsjax/jax, see rsjax.runtime)
# unless a cache is set: give them a temporary one, so the tests write nothing
# into the checkout (and programs compiled alike in several tests compile once).
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="rsjax_tests_jax_cache_")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _COMPILATION_CACHE)
# Every program is cached, not only those that took a second to compile: the
# tests compile many programs of 0.1-1 s, alike across tests and processes
# (the suite took 628 s instead of 676 s, two consecutive runs, 2-core AMD EPYC).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Likewise datasets built without a data_dir (the default is ~/tensorflow_datasets):
# a temporary folder, never the user's home.
_DATA_DIR = tempfile.mkdtemp(prefix="rsjax_tests_tfds_")
atexit.register(shutil.rmtree, _DATA_DIR, ignore_errors=True)
os.environ.setdefault("TFDS_DATA_DIR", _DATA_DIR)

# Run against this checkout even when another copy of rsjax is installed.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests (hypothesis, in the test extra) draw the same examples on every
# run (derandomize: CI's verdict never depends on luck), keep no example
# database in the checkout, and have no per-example deadline (a first call may
# compile).
settings.register_profile("rsjax", derandomize=True, database=None, deadline=None,
                          print_blob=True)
settings.load_profile("rsjax")

TESTS_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def tests_data() -> Path:
    return TESTS_DATA


@pytest.fixture(scope="session")
def run6(demo_data_dir, tmp_path_factory):
    """A 6-step tiny pix2pix run with checkpoints at steps 2, 4 and 6, trained once
    per test run for the checkpoint tests. Shared: copy its workdir (and config)
    before changing them."""
    from trainer_utils import tiny_fusion_config

    from rsjax.trainers import get_trainer

    config = tiny_fusion_config(demo_data_dir, steps=6)
    config.keep_checkpoints = 3

    def train(folder: Path) -> None:
        get_trainer(config.trainer)(config, str(folder / "run"))

    workdir = built_once(tmp_path_factory, "ckpt", train) / "run"
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]
    return config, workdir


@pytest.fixture
def mount_tmpfs(tmp_path):
    """`mount_tmpfs("48k") -> Path`: a real small file system (tmpfs), so that writes
    fill it (a full disk, not a patched write); skipped where mounting is not allowed."""
    import shutil
    import subprocess
    import uuid

    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        if shutil.which("mount") is None or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", f"rsjax-{uuid.uuid4().hex[:8]}",
                 str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot mount a small tmpfs here (needs root)")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` run once per test run, however many xdist workers: the
    first worker to get here builds <shared temp>/<name> under an exclusive lock
    and marks it done; the others wait for the lock and reuse the folder (a
    dataset or a trained run costs 10-30 s of a 2-core machine)."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base   # shared by the workers
    folder, done = root / name, root / name / ".built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)              # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)     # a build that failed in another worker
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    """The `synthetic_demo` TFDS dataset (8 scenes, 64 px tiles), built once per test run."""
    import ml_collections

    from rsjax import input_pipeline

    def build(data_dir: Path) -> None:
        input_pipeline.ensure_dataset(ml_collections.ConfigDict(dict(
            name="rs_multisource/synthetic_demo", data_dir=str(data_dir), tile_size=64,
            worker_count=0)))
    return built_once(tmp_path_factory, "tfds", build)


# A small dataset with clouds: 3 synthetic scenes of 128 px, 32 px tiles; split
# seed 3 puts 5 tiles of 24-99 % cloud cover, each with some clear pixels but
# one, in the test split.
CLOUDY_DATA = dict(name="rs_multisource/synthetic_cloudy_demo", tile_size=32, synthetic_scenes=3,
                   synthetic_size=128, split_seed=3)


@pytest.fixture(scope="session")
def cloudy_data_dir(tmp_path_factory) -> Path:
    """A small `synthetic_cloudy_demo` dataset (CLOUDY_DATA), built once per test run."""
    import ml_collections

    from rsjax import input_pipeline

    def build(data_dir: Path) -> None:
        input_pipeline.ensure_dataset(ml_collections.ConfigDict(dict(
            data_dir=str(data_dir), worker_count=0, **CLOUDY_DATA)))
    return built_once(tmp_path_factory, "tfds_cloudy", build)


@pytest.fixture(scope="session")
def cloudy_scene(cloudy_data_dir):
    """A scene of the cloudy dataset with both clear and cloudy pixels."""
    import rasterio

    from rsjax.data.contract import CLOUD_CLEAR, find_scenes

    folder = next(cloudy_data_dir.rglob("*_s2_cloudy.tif")).parent
    for scene in find_scenes(folder, clouds=True):
        with rasterio.open(scene.cloud_mask) as f:
            clear = (f.read(1) == CLOUD_CLEAR).mean()
        if 0.1 < clear < 0.9:
            return scene
    raise AssertionError("no partly cloudy scene")


@pytest.fixture(autouse=True)
def _rsjax_logger_propagates():
    """Commands run in-process (rsjax.cli) give the 'rsjax' logger its own
    handler and stop propagation, for people; tests read warnings through
    caplog, which listens on the root logger, so undo that after each test."""
    import logging

    yield
    logger = logging.getLogger("rsjax")
    logger.propagate = True
    for handler in list(logger.handlers):
        logger.removeHandler(handler)


# ---------------------------------------------------------------------------
# CI: no test may be silently absent
# ---------------------------------------------------------------------------
# A skip (no gdaldem, no TensorFlow, fewer than 8 devices) is fine on a
# developer's machine, where `-ra` lists it; in CI (.ci/run sets
# RSJAX_FAIL_ON_SKIP=1) it means something the tests need is missing, so the
# run fails and names each skipped test.
def _skipped(config) -> list:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    return list(reporter.stats.get("skipped", [])) if reporter is not None else []


def _fail_on_skip() -> bool:
    return os.environ.get("RSJAX_FAIL_ON_SKIP") == "1"


def pytest_sessionfinish(session, exitstatus):
    if _fail_on_skip() and exitstatus == 0 and _skipped(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    skipped = _skipped(config)
    if _fail_on_skip() and skipped:
        terminalreporter.section("skipped tests fail this run (RSJAX_FAIL_ON_SKIP=1)", red=True)
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            terminalreporter.line(f"{report.nodeid}: {reason}")
