"""`rsjax build` and `rsjax bench pipeline` as a user runs them: a fresh build,
one found and not rebuilt, --overwrite, TFRecord files, and the pipeline
benchmark's report, on the builder's two small dummy scenes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rsjax import cli

DUMMY_DATA = Path(__file__).resolve().parents[1] / "tfds_builder" / "rs_multisource" / "dummy_data"
# The dummy scenes at 16 px tiles in one-tile blocks, split_seed 1: every split gets tiles
# (the counts of the builder's own test, tfds_builder/.../rs_multisource_dataset_builder_test.py).
DUMMY = ["--config", "manual", "--manual_dir", str(DUMMY_DATA), "--tile_size", "16",
         "--block_tiles", "1", "--split_seed", "1"]
SPLITS = {"train": 21, "validation": 5, "test": 5}
DATASET = "rs_multisource/manual_b1_seed1_t16"


def run_command(capsys, *argv) -> dict:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    return json.loads(captured.out[captured.out.index("{"):])


def tile_ids(data_dir: Path, split: str, file_format: str = "array_record") -> list[str]:
    """The split's tile ids, read back as a user would (TFDS, no rsjax)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(data_dir / DATASET / "1.0.0"))
    assert builder.info.file_format.value == file_format
    if file_format == "tfrecord":
        return sorted(ex["tile_id"].decode() for ex in tfds.as_numpy(builder.as_dataset(split=split)))
    source = builder.as_data_source(split=split)
    return sorted(source[i]["tile_id"].decode() for i in range(len(source)))


def dataset_files(data_dir: Path) -> dict:
    return {p.relative_to(data_dir): p.stat().st_mtime_ns
            for p in (data_dir / DATASET).rglob("*") if p.is_file()}


def test_build_command_builds_finds_and_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "tfds"
    first = run_command(capsys, "build", *DUMMY, "--data_dir", str(data_dir))
    assert first["built"] is True and first["dataset"] == DATASET
    assert first["splits"] == SPLITS and first["tiles_per_s"] > 0
    assert first["build_report"]["num_scenes"] == 2
    ids = {split: tile_ids(data_dir, split) for split in SPLITS}
    assert {split: len(v) for split, v in ids.items()} == SPLITS
    files = dataset_files(data_dir)
    assert any(p.name.endswith(".array_record-00000-of-00001") for p in files)

    again = run_command(capsys, "build", *DUMMY, "--data_dir", str(data_dir))
    assert again["built"] is False and again["splits"] == SPLITS
    assert again["tiles_per_s"] is None
    assert dataset_files(data_dir) == files                  # found, not rewritten

    over = run_command(capsys, "build", *DUMMY, "--data_dir", str(data_dir), "--overwrite")
    assert over["built"] is True and over["splits"] == SPLITS
    rewritten = dataset_files(data_dir)
    assert set(rewritten) == set(files) and all(rewritten[p] != files[p] for p in files
                                                if p.name.startswith("rs_multisource-"))
    assert {split: tile_ids(data_dir, split) for split in SPLITS} == ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tfds"]   # nothing else created


def test_build_command_writes_tfrecord_files_that_tensorflow_reads(tmp_path, monkeypatch, capsys):
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pytest.skip("TFRecord needs TensorFlow: pip install -e '.[tf]'")
    monkeypatch.chdir(tmp_path)
    summary = run_command(capsys, "build", *DUMMY, "--data_dir", "tfrecord", "--file_format",
                          "tfrecord")
    assert summary["built"] is True and summary["splits"] == SPLITS
    files = dataset_files(tmp_path / "tfrecord")
    assert any(".tfrecord-" in p.name for p in files)
    assert not any("array_record" in p.name for p in files)
    array_record = tmp_path / "array_record"
    run_command(capsys, "build", *DUMMY, "--data_dir", str(array_record))
    for split in SPLITS:
        assert tile_ids(tmp_path / "tfrecord", split, "tfrecord") == tile_ids(array_record, split)


def test_build_command_without_tensorflow_refuses_tfrecord_before_writing(tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorflow", None)      # `import tensorflow` fails
    assert cli.main(["build", *DUMMY, "--data_dir", "tfds", "--file_format", "tfrecord"]) == 2
    err = capsys.readouterr().err
    assert "--file_format tfrecord needs TensorFlow" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_bench_pipeline_reports_build_and_pipeline_rates_and_cleans_up(tmp_path, monkeypatch,
                                                                      capsys):
    """The figures agree with each other and with the dataset; the temporary
    data_dir (in TMPDIR) is gone afterwards."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(tmp_path)
    report = run_command(capsys, "bench_pipeline", *DUMMY, "--batch_size", "4", "--batches", "3",
                         "--workers", "0")
    assert report["dataset"] == DATASET and report["tile_size"] == 16
    assert report["splits"] == SPLITS
    build = report["build"]
    assert build["tiles"] == sum(SPLITS.values()) and build["seconds"] > 0
    assert build["tiles_per_s"] == pytest.approx(build["tiles"] / build["seconds"], rel=0.05)
    timed = report["pipeline"]["workers_0"]
    assert timed["timed_tiles"] == 12 and timed["tiles_per_s"] > 0 and timed["startup_s"] >= 0
    # Only TFDS's own empty *tfds folders (DatasetInfo.initialize_from_bucket) are left.
    assert [p.name for p in scratch.iterdir() if not p.name.endswith("tfds") or any(p.iterdir())] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
