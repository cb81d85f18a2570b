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
