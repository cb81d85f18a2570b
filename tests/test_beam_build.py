"""The rs_multisource build on Apache Beam (DirectRunner, 2 worker processes) gives
the dataset the single-process build gives; a failed or killed Beam build leaves
nothing that loads.

TFDS serializes examples as tf.train.Example protos whose feature map is
written in an order that varies between processes (protobuf's map order), in
either build path; so records are compared in protobuf's canonical
(deterministic) encoding, and decoded arrays byte for byte.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tensorflow_datasets as tfds

beam = pytest.importorskip("apache_beam")

from array_record.python import array_record_module  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from tensorflow_datasets.proto import tf_example_pb2  # noqa: E402

from rsjax.data import contract, splits  # noqa: E402
from rsjax.tfds_builder.rs_multisource import rs_multisource_dataset_builder as rsm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DUMMY_DATA = ROOT / "tfds_builder" / "rs_multisource" / "dummy_data"
# Overlapping tiles (stride 8 < 16), so some tiles straddle blocks of two splits
# and are dropped: the counters that must add up across workers are exercised.
# Two 64 px scenes, 7 x 7 tiles each; split_seed 1 leaves no split empty.
CONFIG = dataclasses.replace(rsm.Builder.builder_configs["manual"], name="manual_overlap",
                             tile_size=16, stride=8, block_tiles=2, split_seed=1)
# 8 tiles per element: one row of 7 tiles, so each scene is ingested as 7 strips.
TILES_PER_ELEMENT = 8


def _download_config(manual_dir, mode="multi_processing", workers=2):
    options = PipelineOptions([f"--direct_num_workers={workers}",
                               f"--direct_running_mode={mode}"])
    return tfds.download.DownloadConfig(manual_dir=str(manual_dir), beam_options=options,
                                        beam_runner=beam.runners.DirectRunner())


@pytest.fixture(scope="module")
def both_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam_build")
    local = rsm.Builder(config=CONFIG, data_dir=str(root / "local"))
    local.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(DUMMY_DATA)))
    started = time.perf_counter()
    beamed = rsm.Builder(config=CONFIG, data_dir=str(root / "beam"),
                         beam_tiles_per_element=TILES_PER_ELEMENT)
    beamed.download_and_prepare(download_config=_download_config(DUMMY_DATA))
    print(f"Beam build (DirectRunner, 2 processes): {time.perf_counter() - started:.1f} s")
    return local, beamed


def _canonical_records(builder, split):
    """The split's records in file order, each re-encoded canonically."""
    files = sorted(glob.glob(os.path.join(str(builder.data_dir), f"*-{split}.array_record-*")))
    out = []
    for path in files:
        reader = array_record_module.ArrayRecordReader(path)
        for raw in reader.read(list(range(reader.num_records()))):
            out.append(tf_example_pb2.Example.FromString(raw).SerializeToString(deterministic=True))
        reader.close()
    return out


def test_beam_build_gives_the_same_dataset(both_builds):
    local, beamed = both_builds
    counts = {name: s.num_examples for name, s in local.info.splits.items()}
    assert {name: s.num_examples for name, s in beamed.info.splits.items()} == counts
    assert all(counts[s] > 0 for s in splits.SPLITS)
    for split in splits.SPLITS:
        a, b = local.as_data_source(split=split), beamed.as_data_source(split=split)
        # The same tile ids in the same order (TFDS shuffles by key in both writers).
        assert [a[i]["tile_id"] for i in range(len(a))] == [b[i]["tile_id"] for i in range(len(b))]
        for i in range(len(a)):
            for key, value in a[i].items():
                other = b[i][key]
                if isinstance(value, np.ndarray):
                    assert value.dtype == other.dtype and value.shape == other.shape
                    assert value.tobytes() == other.tobytes(), (split, i, key)
                else:
                    assert value == other
        assert _canonical_records(local, split) == _canonical_records(beamed, split)
    # Statistics from the Beam combiner, bit for bit those of the single pass.
    assert beamed.info.metadata[rsm.STATISTICS_KEY] == local.info.metadata[rsm.STATISTICS_KEY]
    report = beamed.info.metadata[rsm.BUILD_REPORT_KEY]
    assert report == local.info.metadata[rsm.BUILD_REPORT_KEY]
    assert report["dropped_straddling_tiles"] > 0           # counted across strips and workers
    assert report["ingest"]["tiles_kept"] == sum(counts.values()) + report["dropped_straddling_tiles"]
    assert report["ingest"]["scenes"]["scene_a"]["tiles_total"] == 49
    # Nothing of the pipeline's own is left in the dataset folder.
    assert not (Path(str(beamed.data_dir)) / rsm.BEAM_SUMMARY_FILE).exists()
    reloaded = tfds.builder_from_directory(str(beamed.data_dir))
    assert reloaded.info.metadata[rsm.STATISTICS_KEY] == local.info.metadata[rsm.STATISTICS_KEY]


def test_strips_cover_every_tile_row_once():
    from rsjax.tfds_builder.rs_multisource import beam_build

    for height, tile, stride, per_row, per_element in [(64, 16, 8, 7, 8), (64, 16, 16, 4, 1),
                                                       (100, 16, 16, 6, 1000), (10, 16, 16, 0, 8)]:
        tile_rows = list(range(0, height - tile + 1, stride))
        parts = beam_build.strips(height, tile, stride, per_row, per_element)
        assert [sum(r in part for part in parts) for r in tile_rows] == [1] * len(tile_rows)
        assert all(a.stop <= b.start for a, b in zip(parts, parts[1:]))
        for part in parts:         # whole tile rows, about per_element tiles each
            rows_in = sum(r in part for r in tile_rows)
            assert rows_in * per_row <= max(per_element, per_row)


def _corrupt_pixels(path: Path) -> None:
    """Scrambles the compressed pixel blocks, keeping the header (the file still opens)."""
    import rasterio
    with rasterio.open(path) as src:
        rows = (src.height + src.block_shapes[0][0] - 1) // src.block_shapes[0][0]
        blocks = [(int(src.get_tag_item(f"BLOCK_OFFSET_0_{r}", "TIFF", bidx=1)),
                   int(src.get_tag_item(f"BLOCK_SIZE_0_{r}", "TIFF", bidx=1))) for r in range(rows)]
    data = bytearray(path.read_bytes())
    for offset, size in blocks:
        data[offset + 2: offset + size] = b"\xff" * (size - 2)
    path.write_bytes(bytes(data))


def _assert_nothing_loads(data_dir: Path) -> None:
    builder = rsm.Builder(config=CONFIG, data_dir=str(data_dir))
    assert not builder.is_prepared()
    with pytest.raises(Exception):
        tfds.data_source(f"rs_multisource/{CONFIG.name}", split="train", data_dir=str(data_dir),
                         download=False)
    version_dir = data_dir / "rs_multisource" / CONFIG.name / "1.0.0"
    assert not version_dir.exists()


def test_a_bad_scene_fails_the_beam_build_by_name_and_leaves_nothing(tmp_path):
    folder = tmp_path / "scenes"
    shutil.copytree(DUMMY_DATA, folder, ignore=shutil.ignore_patterns("*.py"))
    _corrupt_pixels(folder / "scene_b_s2.tif")
    data_dir = tmp_path / "tfds"
    builder = rsm.Builder(config=CONFIG, data_dir=str(data_dir), beam_tiles_per_element=8)
    with pytest.raises(contract.InputError, match=r"scene_b_s2\.tif.*corrupt") as info:
        builder.download_and_prepare(download_config=_download_config(folder, mode="in_memory",
                                                                     workers=1))
    assert "Traceback" not in str(info.value)
    _assert_nothing_loads(data_dir)


def test_an_empty_split_is_the_same_error_as_without_beam(tmp_path):
    empty = dataclasses.replace(CONFIG, split_seed=0)   # this draw leaves the test split empty
    with pytest.raises(contract.InputError, match="the test split got no tiles from 2 scene"):
        rsm.Builder(config=empty, data_dir=str(tmp_path / "local")).download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(DUMMY_DATA)))
    with pytest.raises(contract.InputError, match="the test split got no tiles from 2 scene"):
        rsm.Builder(config=empty, data_dir=str(tmp_path / "beam")).download_and_prepare(
            download_config=_download_config(DUMMY_DATA, mode="in_memory", workers=1))


_KILLED_BUILD = """
import sys, tensorflow_datasets as tfds, apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
sys.path.insert(0, {tests!r})
import test_beam_build as t
b = t.rsm.Builder(config=t.CONFIG, data_dir={data_dir!r}, beam_tiles_per_element=1)
b.download_and_prepare(download_config=t._download_config({manual!r}, mode="multi_processing"))
"""


def test_a_killed_beam_build_leaves_nothing_that_loads(tmp_path):
    data_dir = tmp_path / "tfds"
    code = _KILLED_BUILD.format(tests=str(ROOT / "tests"), data_dir=str(data_dir),
                                manual=str(DUMMY_DATA))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=str(ROOT), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill it once TFDS has opened its temporary folder and the pipeline runs
        # (the DirectRunner's worker processes are up).
        deadline = time.monotonic() + 120
        config_dir = data_dir / "rs_multisource" / CONFIG.name
        running = False
        while time.monotonic() < deadline and proc.poll() is None and not running:
            time.sleep(0.2)
            running = (any(config_dir.glob("incomplete.*"))
                       and bool(psutil.Process(proc.pid).children(recursive=True)))
        assert running and proc.poll() is None, "the build ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)        # the build and its Beam worker processes
        proc.wait(timeout=30)
    _assert_nothing_loads(data_dir)
