"""`rsjax build` as a user meets it: clean one-line errors with their exit status, and builds
that leave nothing behind."""
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from rsjax import build_dataset

ROOT = Path(__file__).resolve().parents[1]
DUMMY = ROOT / "tfds_builder" / "rs_multisource" / "dummy_data"


@pytest.fixture
def small_disk(tmp_path):
    """A real 48 KiB filesystem (tmpfs), so a build fills it; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=48k", f"rsjax-{uuid.uuid4().hex[:8]}", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_is_one_line(small_disk, capsys):
    code = build_dataset.main(["--config", "manual", "--manual_dir", str(DUMMY),
                               "--data_dir", str(small_disk / "tfds"), "--tile_size", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert code == 1 and len(errors) == 1, err[-5:]
    assert "disk is full" in errors[0] and str(small_disk) in errors[0] and "Traceback" not in "\n".join(err)
