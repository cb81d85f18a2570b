"""Shared pytest setup.

Tests run on 8 fake CPU devices so that data parallelism is exercised for real;
the flag must be set before JAX is imported anywhere.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
