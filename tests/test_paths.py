"""Where rsjax puts things when the user names nothing, and the configs of
your own exports: nothing relative to the current directory, the same
dataset found from anywhere."""
from __future__ import annotations

import json
import os

import pytest

from rsjax import config_loader, input_pipeline, runtime
from rsjax.errors import ConfigError


def test_the_data_dir_is_tfds_data_dir_else_tfds_default_never_the_current_directory(
        monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    config = config_loader.load_config("fusion:demo")
    assert config.data.data_dir is None
    assert input_pipeline.data_dir_of(config.data) == str(tmp_path / "home" / "tensorflow_datasets")
    monkeypatch.setenv("TFDS_DATA_DIR", "/data/tfds")
    assert input_pipeline.data_dir_of(config.data) == "/data/tfds"
    # A relative folder the user names is made absolute once, for config.json.
    config = config_loader.load_config("fusion:manual", ["data.data_dir=mine",
                                                         "data.manual_dir=exports"], lock=False)
    input_pipeline.resolve_paths(config.data)
    assert config.data.data_dir == str(tmp_path / "mine")
    assert config.data.manual_dir == str(tmp_path / "exports")
    config.data.data_dir = "gs://bucket/tfds"
    input_pipeline.resolve_paths(config.data)
    assert config.data.data_dir == "gs://bucket/tfds"


def test_the_compilation_cache_is_rsjax_cache_dir_else_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("RSJAX_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert runtime.compilation_cache_dir() == str(tmp_path / "home" / ".cache" / "rsjax" / "jax")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.compilation_cache_dir() == str(tmp_path / "xdg" / "rsjax" / "jax")
    monkeypatch.setenv("RSJAX_CACHE_DIR", "cache")
    assert runtime.compilation_cache_dir() == str(tmp_path / "cache" / "jax")


@pytest.mark.parametrize("spec, dataset", [
    ("fusion:manual", "rs_multisource/manual"),
    ("pix2pix:manual", "rs_multisource/manual"),
    ("segmentation:manual,data=real", "rs_multisource/manual"),
    ("cloud_removal:manual", "rs_multisource/manual_cloudy"),
    ("fusion:manual,demo,sources=s2_cloudy+s1", "rs_multisource/manual_cloudy"),
])
def test_every_trainer_takes_your_exports_at_the_papers_tile_size(spec, dataset):
    config = config_loader.load_config(spec, ["data.manual_dir=/exports"])
    assert config.data.name == dataset and config.data.tile_size == 256
    assert config.data.manual_dir == "/exports"
    assert input_pipeline.dataset_name(config.data) == dataset
    config = config_loader.load_config(spec, ["data.tile_size=64"])
    assert input_pipeline.dataset_name(config.data) == f"{dataset}_t64"


def test_a_synthetic_config_has_no_manual_dir():
    with pytest.raises(ConfigError, match="data.manual_dir: no such config key"):
        config_loader.load_config("fusion:demo", ["data.manual_dir=/exports"])


def test_a_saved_config_json_loads_as_that_run_with_overrides(tmp_path, monkeypatch):
    config = config_loader.load_config("fusion:demo", ["total_steps=12", "data.tile_size=32"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    monkeypatch.chdir(tmp_path)
    again = config_loader.load_config("run/config.json", ["seed=3"])
    assert again.total_steps == 12 and again.data.tile_size == 32 and again.seed == 3
    assert again.data.sources == config.data.sources        # a tuple again, as configs hold it
    assert config_loader.load_config(str(run / "config.json")).to_dict() == config.to_dict()
    (tmp_path / "other.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ConfigError, match="not an rsjax run's config.json"):
        config_loader.load_config("other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        config_loader.load_config(os.path.join(tmp_path, "broken.json"))
