"""Tests of the rs_multisource builder on dummy_data/ (two tiny real GeoTIFF scenes).

`RsMultisourceTest` is TFDS's own DatasetBuilderTestCase. That class derives
from tf.test.TestCase and reads the splits with `as_dataset`, so it needs
TensorFlow (the `tf` extra; CI installs it) and is skipped without it. The pytest tests below
check the same things without TensorFlow, reading through `as_data_source`:
the build under the same `os`/`open` ban inside the builder module, exact
per-split counts, no example in two splits, keys free of local paths, the
reload (counts and metadata) and the features' shapes and dtypes. They also
cover bad input and the corrupt-file-mid-build case.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rsjax.data import contract
from rsjax.tfds_builder.rs_multisource import rs_multisource_dataset_builder as rsm

DUMMY_DATA = Path(__file__).resolve().parent / "dummy_data"
# The manual config at a tile size that fits the 64 px dummy scenes (16 tiles
# each; scene_b's empty corner tile is dropped), with one-tile blocks. 31
# tiles are few blocks for a 7:2:1 hash split: split_seed 1 is a draw that
# leaves no split empty (seed 0 gives no test tile).
DUMMY_CONFIG = dataclasses.replace(
    rsm.Builder.builder_configs["manual"], name="manual_dummy", tile_size=16, block_tiles=1,
    split_seed=1)
EXPECTED_SPLITS = {"train": 21, "validation": 5, "test": 5}

HAVE_TF = importlib.util.find_spec("tensorflow") is not None

if HAVE_TF:
    class RsMultisourceTest(tfds.testing.DatasetBuilderTestCase):
        """TFDS's standard builder test (needs TensorFlow)."""
        DATASET_CLASS = rsm.Builder
        BUILDER_CONFIG_NAMES_TO_TEST = [DUMMY_CONFIG]
        SPLITS = EXPECTED_SPLITS
        SKIP_CHECKSUMS = True
        # TFDS looks beside the builder's `code_path`, which an editable install
        # (package_dir) does not resolve to this folder.
        EXAMPLE_DIR = str(DUMMY_DATA)
        def test_session(self, *args, **kwargs):
            """tf.test.TestCase's session helper, which TFDS's graph-mode check
            calls; collected by name, it would be a test that always skips."""
            return super().test_session(*args, **kwargs)

        test_session.__test__ = False

        def _make_builder(self, config=None):
            # as_dataset reads TFRecord files with tf.data.
            return self.dataset_class(data_dir=self.tmp_dir, config=config, version=self.VERSION,
                                      file_format="tfrecord")
else:
    @pytest.mark.skip(reason="TFDS's DatasetBuilderTestCase (RsMultisourceTest) needs "
                             "TensorFlow: pip install -e '.[tf]'")
    def test_tfds_dataset_builder_test_case():
        """Stands in for RsMultisourceTest, so that its absence shows as a skip."""


# ----------------------------------------------------------------------------
# The same checks without TensorFlow
# ----------------------------------------------------------------------------

@contextlib.contextmanager
def forbidden_os_in_builder_module():
    """What DatasetBuilderTestCase does: `os` and `open` raise inside the builder module."""
    err = AssertionError("use etils.epath, not os/open, in the builder module")
    mock_path = mock.Mock(os.path, wraps=os.path)
    mock_os = mock.Mock(os, path=mock_path, fspath=os.fspath)
    for name in ("listdir", "walk", "makedirs", "mkdir", "remove", "rename", "stat", "scandir"):
        getattr(mock_os, name).side_effect = err
    for name in ("exists", "isdir", "isfile", "getsize"):
        getattr(mock_path, name).side_effect = err
    builtins = dict(__builtins__) if isinstance(__builtins__, dict) else dict(vars(__builtins__))
    builtins["open"] = mock.Mock(side_effect=err)
    with mock.patch(f"{rsm.__name__}.os", mock_os, create=True), \
         mock.patch(f"{rsm.__name__}.__builtins__", builtins):
        yield


def _build(data_dir, manual_dir, config=DUMMY_CONFIG):
    builder = rsm.Builder(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


@pytest.fixture(scope="module")
def dummy_dataset(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    keys = []
    original = rsm.Builder._generate_examples

    def recording(self, *args, **kwargs):
        for key, example in original(self, *args, **kwargs):
            keys.append(key)
            yield key, example

    with mock.patch.object(rsm.Builder, "_generate_examples", recording), \
         forbidden_os_in_builder_module():
        builder = _build(data_dir, DUMMY_DATA)
    return builder, data_dir, keys


def test_exact_split_counts_and_no_example_in_two_splits(dummy_dataset):
    builder, data_dir, keys = dummy_dataset
    counts = {name: s.num_examples for name, s in builder.info.splits.items()}
    assert counts == EXPECTED_SPLITS
    seen = {}
    for split in EXPECTED_SPLITS:
        ds = builder.as_data_source(split=split)
        ids = {ds[i]["tile_id"] for i in range(len(ds))}
        assert len(ids) == EXPECTED_SPLITS[split]
        for other, other_ids in seen.items():
            assert not ids & other_ids, f"{split} and {other} share tiles"
        seen[split] = ids
    assert len(keys) == sum(EXPECTED_SPLITS.values()) == len(set(keys))
    assert not any(str(DUMMY_DATA) in k or "/" in k for k in keys)   # keys never hold paths


def test_features_follow_the_data_contract(dummy_dataset):
    builder, _, _ = dummy_dataset
    ex = builder.as_data_source(split="train")[0]
    assert ex["s2"].shape == (16, 16, 4) and ex["s2"].dtype == np.uint16
    assert ex["s1"].shape == (16, 16, 2) and ex["s1"].dtype == np.float32
    assert ex["lulc"].shape == (16, 16) and ex["lulc"].dtype == np.uint8
    assert ex["dem"].shape == (16, 16, 4) and ex["dem"].dtype == np.float32
    assert ex["transform"].shape == (6,) and ex["transform"].dtype == np.float64
    assert ex["scene_id"] in (b"scene_a", b"scene_b")
    assert b"32631" in ex["crs"]
    assert set(np.unique(ex["lulc"])) <= set(range(9)) | {255}
    assert builder.info.file_format.value == "array_record"


def test_statistics_survive_reload_and_match_the_train_split(dummy_dataset):
    builder, data_dir, _ = dummy_dataset
    reloaded = tfds.builder(f"rs_multisource/{DUMMY_CONFIG.name}", data_dir=str(data_dir))
    stats = reloaded.info.metadata[rsm.STATISTICS_KEY]
    assert stats["num_tiles"] == EXPECTED_SPLITS["train"]
    assert {name: s.num_examples for name, s in reloaded.info.splits.items()} == EXPECTED_SPLITS
    # Recompute the S1 mean and class counts from the stored train tiles.
    ds = reloaded.as_data_source(split="train")
    s1 = np.concatenate([ds[i]["s1"].reshape(-1, 2) for i in range(len(ds))]).astype(np.float64)
    np.testing.assert_allclose(stats["s1"]["mean"], np.nanmean(s1, axis=0), rtol=1e-9)
    labels = np.concatenate([ds[i]["lulc"].ravel() for i in range(len(ds))])
    assert stats["lulc"]["counts"] == np.bincount(labels[labels < 9], minlength=9).tolist()
    report = reloaded.info.metadata[rsm.BUILD_REPORT_KEY]
    assert report["num_scenes"] == 2 and report["config"]["tile_size"] == 16
    # The data source API users see, also without the builder class registered.
    tfds_ds = tfds.data_source(f"rs_multisource/{DUMMY_CONFIG.name}", split="test",
                               data_dir=str(data_dir), download=False)
    assert len(tfds_ds) == EXPECTED_SPLITS["test"]
    read_only = tfds.builder_from_directory(str(reloaded.data_dir))
    assert read_only.info.metadata[rsm.STATISTICS_KEY]["num_tiles"] == EXPECTED_SPLITS["train"]


def test_builds_are_deterministic(dummy_dataset, tmp_path):
    builder, _, _ = dummy_dataset
    again = _build(tmp_path, DUMMY_DATA)
    for split in ("validation", "test"):
        a, b = builder.as_data_source(split=split), again.as_data_source(split=split)
        assert [a[i]["tile_id"] for i in range(len(a))] == [b[i]["tile_id"] for i in range(len(b))]
        np.testing.assert_array_equal(a[0]["dem"], b[0]["dem"])
    assert again.info.metadata[rsm.STATISTICS_KEY] == builder.info.metadata[rsm.STATISTICS_KEY]


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

def _copy_dummy(tmp_path) -> Path:
    folder = tmp_path / "scenes"
    shutil.copytree(DUMMY_DATA, folder, ignore=shutil.ignore_patterns("*.py"))
    return folder


def test_a_scene_missing_a_source_is_named_or_skipped(tmp_path):
    folder = _copy_dummy(tmp_path)
    (folder / "scene_b_s1.tif").unlink()
    with pytest.raises(contract.InputError, match=r"scene 'scene_b'.*missing s1"):
        _build(tmp_path / "tfds", folder)
    skipping = dataclasses.replace(DUMMY_CONFIG, name="manual_dummy_skip", skip_incomplete_scenes=True,
                                   split_mode="random", split_seed=0)
    builder = _build(tmp_path / "tfds", folder, skipping)
    report = builder.info.metadata[rsm.BUILD_REPORT_KEY]
    assert report["skipped_scenes"] == [{"scene_id": "scene_b", "missing": ["s1"]}]
    assert sum(s.num_examples for s in builder.info.splits.values()) == 16


def test_scene_ids_that_differ_between_sources_are_reported(tmp_path):
    folder = _copy_dummy(tmp_path)
    for p in folder.glob("scene_b_*.tif"):
        p.unlink()
    (folder / "scene_a_s1.tif").rename(folder / "sceneA_s1.tif")
    with pytest.raises(contract.InputError, match="scene ids probably differ"):
        _build(tmp_path / "tfds", folder)


def test_a_corrupt_file_mid_build_leaves_no_dataset(tmp_path):
    folder = _copy_dummy(tmp_path)
    path = folder / "scene_b_s2.tif"           # scene_b is read after scene_a
    # Scramble the compressed pixel data but keep the header: the file opens and
    # validates, and reading its pixels fails once scene_a's tiles are written.
    import rasterio
    with rasterio.open(path) as src:
        rows = (src.height + src.block_shapes[0][0] - 1) // src.block_shapes[0][0]
        blocks = [(int(src.get_tag_item(f"BLOCK_OFFSET_0_{r}", "TIFF", bidx=1)),
                   int(src.get_tag_item(f"BLOCK_SIZE_0_{r}", "TIFF", bidx=1))) for r in range(rows)]
    data = bytearray(path.read_bytes())
    for offset, size in blocks:
        data[offset + 2: offset + size] = b"\xff" * (size - 2)
    path.write_bytes(bytes(data))
    data_dir = tmp_path / "tfds"
    with pytest.raises(contract.InputError, match="scene_b"):
        _build(data_dir, folder)
    builder = rsm.Builder(config=DUMMY_CONFIG, data_dir=str(data_dir))
    assert not builder.is_prepared()
    # TFDS wrote into a tmp dir (incomplete.*) and removed it: no file of this config is left.
    config_dir = data_dir / "rs_multisource" / DUMMY_CONFIG.name
    assert not config_dir.exists() or [p for p in config_dir.rglob("*") if p.is_file()] == []
    # A reader finds no dataset (not a half-written one).
    with pytest.raises(KeyError, match="has not been generated yet"):
        rsm.Builder(config=DUMMY_CONFIG, data_dir=str(data_dir)).as_data_source(split="train")


def test_synthetic_config_writes_its_scenes_and_builds(tmp_path):
    config = dataclasses.replace(
        rsm.Builder.builder_configs["synthetic_demo"], name="synthetic_tiny", synthetic_scenes=2,
        synthetic_size=128, tile_size=32, block_tiles=1)
    builder = rsm.Builder(config=config, data_dir=str(tmp_path))
    builder.download_and_prepare()
    counts = {name: s.num_examples for name, s in builder.info.splits.items()}
    report = builder.info.metadata[rsm.BUILD_REPORT_KEY]
    assert sum(counts.values()) == report["ingest"]["tiles_kept"] > 0
    assert report["ingest"]["tiles_kept"] + report["ingest"]["tiles_dropped_nodata"] == 2 * 16
    assert builder.info.metadata[rsm.STATISTICS_KEY]["num_tiles"] == counts["train"]
    scenes = sorted(p.name for p in (tmp_path / "downloads" / "rs_multisource_synthetic").rglob("*.tif"))
    assert len(scenes) >= 8 and scenes[0].endswith(("_dem.tif", "_lulc.tif", "_s1.tif", "_s2.tif"))


# ----------------------------------------------------------------------------
# Real exports as they come: split pieces, the S2 BOA offset, another legend
# ----------------------------------------------------------------------------

def _all_examples(builder) -> dict:
    out = {}
    for split in builder.info.splits:
        ds = builder.as_data_source(split=split)
        for i in range(len(ds)):
            out[ds[i]["tile_id"]] = ds[i]
    return out


def test_split_export_with_boa_offset_and_a_mapped_legend_builds_the_same_tiles(dummy_dataset, tmp_path):
    """scene_a's S2 as Earth Engine splits it (four 32 px pieces) with the baseline-04.00 offset
    declared, and its land cover as a binary map read through lulc_map: the same tiles as the
    plain dummy build, with the mapped labels."""
    import rasterio
    from rasterio.windows import Window

    builder, _, _ = dummy_dataset
    folder = _copy_dummy(tmp_path)
    for p in folder.glob("scene_b_*.tif"):
        p.unlink()
    s2 = folder / "scene_a_s2.tif"
    with rasterio.open(s2) as src:
        profile, data, descriptions = src.profile, src.read().astype(np.int32), src.descriptions
    for row in (0, 32):
        for col in (0, 32):
            piece = folder / f"scene_a_s2-{row:010d}-{col:010d}.tif"
            window = Window(col, row, 32, 32)
            with rasterio.open(piece, "w", **dict(profile, width=32, height=32,
                                                  transform=rasterio.windows.transform(window, profile["transform"]))) as dst:
                block = data[:, row:row + 32, col:col + 32]
                dst.write(np.where(block > 0, block + 1000, 0).astype(np.uint16))
                for i, d in enumerate(descriptions, start=1):
                    dst.set_band_description(i, d)
                    dst.update_tags(i, BOA_ADD_OFFSET="-1000")
    s2.unlink()
    lulc = folder / "scene_a_lulc.tif"
    with rasterio.open(lulc) as src:
        profile, labels = src.profile, src.read(1)
    with rasterio.open(lulc, "w", **profile) as dst:          # 1 = "vegetated" (labels >= 2), 0 = not
        dst.write((labels >= 2).astype(np.uint8), 1)
    plain_config = dataclasses.replace(DUMMY_CONFIG, name="manual_dummy_split", split_mode="random")
    with pytest.raises(contract.InputError, match="holds only the values 0 and 1"):
        _build(tmp_path / "tfds", folder, plain_config)
    mapped = dataclasses.replace(plain_config, name="manual_dummy_split_mapped", lulc_map="1:2,0:255",
                                 max_nodata_fraction=1.0)
    built = _all_examples(_build(tmp_path / "tfds", folder, mapped))
    reference = {k: v for k, v in _all_examples(builder).items() if v["scene_id"] == b"scene_a"}
    assert reference and set(reference) <= set(built)
    for tile_id, ex in reference.items():
        np.testing.assert_array_equal(built[tile_id]["s2"], ex["s2"])
        np.testing.assert_array_equal(built[tile_id]["s1"], ex["s1"])
        np.testing.assert_array_equal(built[tile_id]["lulc"], np.where(ex["lulc"] >= 2, 2, 255))


def test_no_scene_yielding_a_tile_is_an_error_naming_each_scene(tmp_path):
    too_big = dataclasses.replace(DUMMY_CONFIG, name="manual_dummy_t128", tile_size=128)
    with pytest.raises(contract.InputError, match=r"(?s)no scene yields a tile.*scene_a.*64 x 64.*128 x 128"):
        _build(tmp_path / "tfds", DUMMY_DATA, too_big)
