"""`rsjax build` as a user meets it: clean one-line errors with their exit status, and builds
that leave nothing behind."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsjax import build_dataset

ROOT = Path(__file__).resolve().parents[1]
DUMMY = ROOT / "tfds_builder" / "rs_multisource" / "dummy_data"


@pytest.fixture
def small_disk(mount_tmpfs):
    """A real 48 KiB filesystem, so a build fills it."""
    return mount_tmpfs("48k")


def test_full_disk_is_one_line(small_disk, capsys):
    code = build_dataset.main(["--config", "manual", "--manual_dir", str(DUMMY),
                               "--data_dir", str(small_disk / "tfds"), "--tile_size", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert code == 1 and len(errors) == 1, err[-5:]
    assert "disk is full" in errors[0] and str(small_disk) in errors[0] and "Traceback" not in "\n".join(err)


def build(*argv) -> int:
    return build_dataset.main(list(map(str, argv)))


def summary(out: str) -> dict:
    """The JSON the build prints last (TFDS prints its own lines before it)."""
    lines = out.splitlines()
    return json.loads("\n".join(lines[lines.index("{"):]))


@pytest.fixture
def exports(tmp_path):
    folder = tmp_path / "exports"
    shutil.copytree(DUMMY, folder)
    return folder


def test_missing_land_cover_allowed_or_skipped_on_request(exports, tmp_path, capsys):
    (exports / "scene_b_lulc.tif").unlink()
    common = ["--config", "manual", "--manual_dir", exports, "--tile_size", "8", "--split_mode", "random"]
    assert build(*common, "--data_dir", tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert "scene_b" in err and "--skip_incomplete_scenes" in err and "--allow_missing_lulc" in err
    assert not (tmp_path / "a").exists()                       # refused before anything was created

    assert build(*common, "--data_dir", tmp_path / "b", "--allow_missing_lulc") == 0
    report = summary(capsys.readouterr().out)["build_report"]
    assert report["num_scenes"] == 2 and not report["ingest"]["scenes"]["scene_b"]["has_lulc"]

    assert build(*common, "--data_dir", tmp_path / "c", "--skip_incomplete_scenes") == 0
    report = summary(capsys.readouterr().out)["build_report"]
    assert report["num_scenes"] == 1
    assert report["skipped_scenes"] == [{"scene_id": "scene_b", "missing": ["lulc"]}]


def test_s1_units_option_reaches_ingestion(exports, tmp_path, capsys):
    common = ["--config", "manual", "--manual_dir", exports, "--tile_size", "8", "--split_mode", "random",
              "--data_dir", tmp_path]
    assert build(*common) == 0
    detected = summary(capsys.readouterr().out)["build_report"]["ingest"]["scenes"]["scene_a"]["s1_units"]
    assert build(*common, "--s1_units", "db" if detected == "linear" else "linear") == 0
    out = summary(capsys.readouterr().out)
    assert out["build_report"]["ingest"]["scenes"]["scene_a"]["s1_units"] != detected
    assert out["build_report"]["config"]["s1_units"] != "auto" and "_s1" in out["dataset"]


def test_tiling_says_its_size_up_front_and_its_progress(exports, tmp_path, capsys):
    assert build("--config", "manual", "--manual_dir", exports, "--tile_size", "16",
                 "--split_mode", "random", "--data_dir", tmp_path) == 0
    captured = capsys.readouterr()
    text = captured.err
    assert "scene 'scene_a': 64 x 64 px on the target grid, 16 tile position(s) of 16 px" in text
    assert "train split: 32/32 tile positions read (100.0%)" in text and "ETA" in text
    # Each split's own count, as the build report has it: the counts add up to the
    # tiles kept (scene_b has one tile over the nodata limit: 31 of the 32 positions).
    kept = {m[0]: int(m[1]) for m in re.findall(r"(\w+) split: (\d+) tiles kept", text)}
    report = summary(captured.out)["build_report"]
    assert set(kept) == {"train", "validation", "test"}
    assert sum(kept.values()) == report["ingest"]["tiles_kept"] == 32 - report["ingest"]["tiles_dropped_nodata"]
    assert kept == summary(captured.out)["splits"]


def test_build_killed_mid_way_leaves_nothing_for_the_next_build(tmp_path):
    """A SIGKILLed build leaves TFDS's incomplete.* folder and its lock; the next build removes
    both (the lock's owner is dead) and builds the dataset."""
    data_dir = tmp_path / "tfds"
    config_dir = data_dir / "rs_multisource" / "synthetic_demo"
    proc = subprocess.Popen([sys.executable, "-m", "rsjax.build_dataset", "--config", "synthetic_demo",
                             "--data_dir", str(data_dir)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not list(config_dir.glob("incomplete.*")):
            assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it was killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    left = list(config_dir.glob("incomplete.*"))
    assert left and (config_dir / "rsjax_build.lock").exists()
    assert build("--config", "synthetic_demo", "--data_dir", data_dir) == 0
    assert not list(config_dir.glob("incomplete.*")) and not (config_dir / "rsjax_build.lock").exists()
    assert (config_dir / "1.0.0" / "dataset_info.json").exists()


def test_bad_scene_is_the_dry_runs_message_and_exit_status(exports, tmp_path, capsys):
    """A truncated file: the build stops as the dry run does, one error naming the file, exit 2."""
    s1 = exports / "scene_a_s1.tif"
    s1.write_bytes(s1.read_bytes()[:600])
    from rsjax import cli
    assert cli.main(["ingest", str(exports), "--tile_size", "16"]) == 2
    dry = capsys.readouterr().err
    assert build("--config", "manual", "--manual_dir", exports, "--tile_size", "16",
                 "--data_dir", tmp_path / "tfds") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(s1) in err
    assert dry[dry.index(str(s1)):].splitlines()[0] in err       # the same message
    assert not list((tmp_path / "tfds").rglob("*.array_record*"))
