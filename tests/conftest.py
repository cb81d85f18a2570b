"""Shared pytest setup.

Tests run on 8 fake CPU devices so that data parallelism is exercised for real;
the flag must be set before JAX is imported anywhere. Tests compile many small
programs and run each a few steps, so XLA's backend optimizations are turned
down (compiles about twice as fast, runs slower: the right trade for tests).
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Run against this checkout even when another copy of rsjax is installed.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

TESTS_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def tests_data() -> Path:
    return TESTS_DATA


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    """The `synthetic_demo` TFDS dataset (8 scenes, 64 px tiles), built once per session."""
    import ml_collections

    from rsjax import input_pipeline

    data_dir = tmp_path_factory.mktemp("tfds")
    cfg = ml_collections.ConfigDict(dict(name="rs_multisource/synthetic_demo",
                                         data_dir=str(data_dir), tile_size=64, worker_count=0))
    input_pipeline.ensure_dataset(cfg)
    return data_dir


# A small dataset with clouds: 3 synthetic scenes of 128 px, 32 px tiles; split
# seed 3 puts 5 tiles of 24-99 % cloud cover, each with some clear pixels but
# one, in the test split.
CLOUDY_DATA = dict(name="rs_multisource/synthetic_cloudy_demo", tile_size=32, synthetic_scenes=3,
                   synthetic_size=128, split_seed=3)


@pytest.fixture(scope="session")
def cloudy_data_dir(tmp_path_factory) -> Path:
    """A small `synthetic_cloudy_demo` dataset (CLOUDY_DATA), built once per session."""
    import ml_collections

    from rsjax import input_pipeline

    data_dir = tmp_path_factory.mktemp("tfds_cloudy")
    input_pipeline.ensure_dataset(ml_collections.ConfigDict(dict(
        data_dir=str(data_dir), worker_count=0, **CLOUDY_DATA)))
    return data_dir


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
