"""Issue 28: a resume with another config (structural change refused, other
changes recorded), and a full disk reported as one line naming the path."""
from __future__ import annotations

import errno
import json
import logging
import threading

import pytest

from trainer_utils import tiny_fusion_config

from rsjax import cli
from rsjax.errors import ConfigError


def _train(config, workdir):
    from rsjax.trainers import get_trainer

    return get_trainer(config.trainer)(config, str(workdir))


@pytest.fixture
def trained(demo_data_dir, tmp_path):
    """A tiny pix2pix run of 2 steps, checkpointed at step 2."""
    config = tiny_fusion_config(demo_data_dir, steps=2)
    config.final_eval_split = None
    workdir = tmp_path / "run"
    _train(config, workdir)
    return config, workdir


def test_resume_with_other_sources_is_an_error_naming_the_keys_before_any_write(trained):
    config, workdir = trained
    before = {p.name: p.stat().st_mtime_ns for p in workdir.iterdir()}
    saved = (workdir / "config.json").read_text()
    other = tiny_fusion_config(config.data.data_dir, steps=4, sources="lulc+s1")
    other.final_eval_split = None
    with pytest.raises(ConfigError) as err:
        _train(other, workdir)
    message = str(err.value)
    assert "data.sources" in message and "--workdir" in message
    assert f"--config {workdir / 'config.json'}" in message
    assert (workdir / "config.json").read_text() == saved
    assert not (workdir / "config_history.jsonl").exists()
    assert {p.name for p in workdir.iterdir()} <= set(before) | {"rsjax.lock"}


def test_resume_with_another_learning_rate_rewrites_config_and_keeps_history(trained):
    config, workdir = trained
    config.optim.g_lr = 1e-5
    config.total_steps = 4
    result = _train(config, workdir)
    assert result["step"] == 4
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["optim"]["g_lr"] == 1e-5 and saved["total_steps"] == 4
    history = [json.loads(line) for line in
               (workdir / "config_history.jsonl").read_text().splitlines()]
    assert len(history) == 1
    assert history[0]["from_step"] == 0 and history[0]["until_step"] == 2
    assert history[0]["config"]["optim"]["g_lr"] == 2e-4
    assert set(history[0]["changed"]) == {"optim.g_lr", "total_steps"}


@pytest.mark.parametrize("trainer", ["fusion", "cloud_removal", "segmentation"])
def test_every_trainer_refuses_a_dtype_it_does_not_honour(demo_data_dir, trainer):
    """float16 was once trained in float32 without a word by the fusion and
    cloud-removal trainers; each Setup now resolves config.dtype the one way."""
    from trainer_utils import load_config
    from rsjax.trainers import cloud_removal, fusion, segmentation

    if trainer == "fusion":
        config = tiny_fusion_config(demo_data_dir, "pix2pix")
        make = lambda c: fusion.Setup(c, fusion.selected_sources(c))        # noqa: E731
    else:
        config = load_config(trainer, "demo")
        make = {"cloud_removal": cloud_removal.Setup, "segmentation": segmentation.Setup}[trainer]
    make(config)                                             # float32: fine
    config.dtype = "float16"
    with pytest.raises(ConfigError, match="config.dtype='float16'.*float32, bfloat16"):
        make(config)
