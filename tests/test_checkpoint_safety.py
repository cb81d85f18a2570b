"""Checkpoints that can be trusted: none poisoned, each verified by checksum, a corrupt one
falls back to the newest intact step (training and `rsjax evaluate`), one writer per workdir,
SIGTERM exits 143, no metrics step twice.

Real Orbax checkpoints from tiny pix2pix runs on the demo dataset, corrupted on disk.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rsjax import evaluate
from rsjax.errors import RunFailed, UserError
from rsjax.logging_utils import read_metrics
from rsjax.trainers import integrity
from trainer_utils import ROOT, largest_data_file, overwrite_middle, tiny_fusion_config


def train(config, workdir):
    from rsjax.trainers import get_trainer

    return get_trainer(config.trainer)(config, str(workdir))


def steps_in(workdir) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def saved_state(workdir, step: int) -> dict:
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def checked_steps(workdir) -> list[int]:
    """The saved steps, each read back: no skipped step in it, its weights finite and sane.
    At least one: a check of no checkpoint at all would pass whatever was saved."""
    steps = steps_in(workdir)
    assert steps, f"no checkpoint in {workdir} to check"
    for step in steps:
        state = saved_state(workdir, step)
        assert int(state["nonfinite"]) == 0 and largest_parameter(state) < 1e8, step   # NaN fails too
    return steps


def largest_parameter(state: dict) -> float:
    """Largest magnitude among the model weights (optimizer moments left out)."""
    out = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        keys = jax.tree_util.keystr(path)
        if "opt" in keys or not jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
            continue
        out = max(out, float(np.max(np.abs(np.asarray(leaf)))))
    return out


@pytest.fixture
def run_copy(run6, tmp_path):
    config, workdir = run6
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return config.copy_and_resolve_references(), copy    # run6 is shared: tests change copies


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def run_evaluate(workdir, tmp_path, capsys, *extra):
    out = tmp_path / "scores.json"
    code = evaluate.main(["--workdir", str(workdir), "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- checksums and fallback ------------------------------------------------------------------

def test_every_saved_step_has_checksums_of_every_file(run6):
    """What integrity.py promises: the size and SHA-256 of every file of the step
    (the weights' data files, not just the metadata), computed here independently."""
    _, workdir = run6
    assert steps_in(workdir) == [2, 4, 6]
    for step in steps_in(workdir):
        folder = workdir / "checkpoints" / str(step)
        listed = json.loads((folder / integrity.MANIFEST).read_text())["files"]
        on_disk = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*")
                   if p.is_file() and p.name != integrity.MANIFEST}
        assert set(listed) == set(on_disk), step
        assert largest_data_file(workdir, step).relative_to(folder).as_posix() in listed
        for name, path in on_disk.items():
            assert listed[name] == {"bytes": path.stat().st_size,
                                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}, name
        assert integrity.verify(folder) is None


@pytest.mark.parametrize("damage", ["truncated_metadata", "overwritten_data", "truncated_metadata_no_checksums"])
def test_evaluate_falls_back_to_the_newest_intact_step(run_copy, tmp_path, capsys, damage):
    _, workdir = run_copy
    step6 = workdir / "checkpoints" / "6"
    if damage == "overwritten_data":
        overwrite_middle(largest_data_file(workdir, 6))
    else:
        truncate(step6 / "state" / "_METADATA")
    if damage.endswith("no_checksums"):          # a checkpoint from before checksums: Orbax's own error
        (step6 / integrity.MANIFEST).unlink()
    code, out, err = run_evaluate(workdir, tmp_path, capsys)
    assert code == 0, err
    assert json.loads(out)["step"] == 4
    assert "step 6" in err and "corrupt" in err and "step 4" in err, err
    assert "JSONDecodeError" not in err and "Traceback" not in err
    if damage == "overwritten_data":
        assert "checksum" in err
    assert steps_in(workdir) == [2, 4, 6]                 # evaluation moves nothing


def test_evaluate_of_a_named_corrupt_step_is_an_error(run_copy, tmp_path, capsys):
    _, workdir = run_copy
    truncate(workdir / "checkpoints" / "6" / "state" / "_METADATA")
    code, out, err = run_evaluate(workdir, tmp_path, capsys, "--step", "6")
    assert code == 2 and out == ""
    assert "step 6" in err and "corrupt" in err and "--step 4" in err


def test_evaluate_on_a_read_only_workdir_prints_the_scores(run_copy, tmp_path, capsys):
    _, workdir = run_copy
    paths = [workdir, *(p for p in workdir.rglob("*") if p.is_dir())]
    for p in paths:
        os.chmod(p, 0o555)
    immutable = False
    if os.access(workdir, os.W_OK):          # root: permission bits do not stop writes
        immutable = subprocess.run(["chattr", "+i", str(workdir)], capture_output=True).returncode == 0
        if not immutable:
            pytest.skip("cannot make a read-only folder here")
    try:
        before = sorted(p.name for p in workdir.iterdir())
        code = evaluate.main(["--workdir", str(workdir)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert json.loads(captured.out)["step"] == 6
        assert "Could not write" in captured.err
        assert sorted(p.name for p in workdir.iterdir()) == before
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(workdir)], check=True)
        for p in paths:
            os.chmod(p, 0o755)


def test_training_resumes_from_the_newest_intact_step(run_copy, caplog):
    config, workdir = run_copy
    overwrite_middle(largest_data_file(workdir, 6))
    config.total_steps = 8
    with caplog.at_level("INFO", logger="rsjax"):
        train(config, workdir)
    err = caplog.text
    assert "step 6" in err and "corrupt" in err and "Resumed from step 4" in err, err
    # The corrupt step was moved aside, not deleted; the run saved 6 and 8 again.
    assert (workdir / "corrupt_checkpoints" / "6" / "state").is_dir()
    assert steps_in(workdir) == [4, 6, 8]
    # metrics.jsonl: each metric once per step (step 6 was logged by both runs; the final
    # evaluation's test_* metrics share the last step's number, on their own line).
    records = read_metrics(workdir, dedupe=False)
    pairs = [(r["step"], key) for r in records for key in r if key not in ("step", "time")]
    assert len(pairs) == len(set(pairs)), sorted(pairs)
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    assert {r["step"] for r in records if "g_loss" in r} == {2, 4, 6, 8}


def test_training_with_every_step_corrupt_refuses(run_copy):
    config, workdir = run_copy
    for step in (2, 4, 6):
        truncate(workdir / "checkpoints" / str(step) / "state" / "_METADATA")
    with pytest.raises(UserError, match=r"no intact checkpoint.*corrupt_checkpoints"):
        train(config, workdir)
    assert steps_in(workdir) == [] and sorted(
        p.name for p in (workdir / "corrupt_checkpoints").iterdir()) == ["2", "4", "6"]


# -- a checkpoint of another config is intact, not corrupt ---------------------------------------

def files_under(folder) -> list[tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size)
                  for p in folder.rglob("*") if p.is_file())


def test_words_of_damage_do_not_make_a_step_whose_checksums_match_corrupt(run_copy):
    _, workdir = run_copy
    step6 = workdir / "checkpoints" / "6"
    # What a checkpoint of another layout (or a workdir path with "corrupt" in it) can raise.
    err = ValueError('NOT_FOUND: Error opening "zarr" driver: No such file: /data/corrupt/.zarray')
    assert not integrity.is_damage(err, step6)               # its files match their checksums
    overwrite_middle(largest_data_file(workdir, 6))
    assert integrity.is_damage(err, step6)                   # they no longer do
    (step6 / integrity.MANIFEST).unlink()
    assert integrity.is_damage(err, step6)                   # no checksums: the words decide
    assert not integrity.is_damage(ValueError("Requested shape: (8,) is not compatible with the "
                                              "stored shape: (4,)."), step6)


@pytest.mark.parametrize("checksums", [True, False])
def test_training_on_a_checkpoint_of_another_config_is_an_error_and_moves_nothing(
        run_copy, demo_data_dir, checksums):
    """Corrupt steps are moved aside and skipped; an intact step of another config must not
    be (nor its older steps, all of that config): an error naming the difference."""
    _, workdir = run_copy
    (workdir / "config.json").unlink()        # as a run from before config.json: no resume check
    if not checksums:                         # judged by the saved tree, then the error's words
        for step in (2, 4, 6):
            (workdir / "checkpoints" / str(step) / integrity.MANIFEST).unlink()
    before = files_under(workdir / "checkpoints")
    other = tiny_fusion_config(demo_data_dir, steps=8, sources="lulc+dem")     # 2 channels fewer
    with pytest.raises(UserError) as info:
        train(other, workdir)
    message = str(info.value)
    assert "step 6 does not fit this config's state" in message, message
    assert "d/first/kernel/value saved (4, 4, 20, 4), here (4, 4, 18, 4)" in message, message
    assert files_under(workdir / "checkpoints") == before
    assert not (workdir / integrity.QUARANTINE).exists()


def test_evaluate_with_another_config_is_an_error_and_moves_nothing(run_copy, tmp_path, capsys):
    _, workdir = run_copy
    before = files_under(workdir / "checkpoints")
    code, out, err = run_evaluate(workdir, tmp_path, capsys, "--config.generator.ngf=8")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and out == "" and len(errors) == 1, err[-2000:]
    assert "step 6 does not fit" in errors[0] and "match their checksums" in errors[0], errors[0]
    assert "here (4, 4, 16, 8)" in errors[0] and "Traceback" not in err
    assert "step 4" not in err                       # no fallback to an older step
    assert files_under(workdir / "checkpoints") == before


# -- no poisoned checkpoint -------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("lr", [1e30, 1e39])
def test_diverged_run_saves_no_poisoned_checkpoint_and_says_what_is_left(demo_data_dir, tmp_path, lr):
    config = tiny_fusion_config(demo_data_dir, steps=6)
    config.checkpoint_every_steps = 1
    config.log_every_steps = 1
    config.max_nonfinite_steps = 2
    config.optim.g_lr = config.optim.d_lr = lr
    workdir = tmp_path / "run"
    with pytest.raises(RunFailed) as info:
        train(config, workdir)
    message = str(info.value)
    # 1e30: step 1's weights are finite but near 1e30 (diverged); 1e39 is inf in float32.
    # Nothing to read back: a step saved at all is the failure (the steps a diverging
    # resume keeps are read back in the next test).
    assert steps_in(workdir) == []
    assert "No checkpoint was saved" in message and "holds finite parameters" not in message
    assert "--workdir" in message


def test_divergence_after_good_steps_names_the_good_checkpoint_and_a_sane_rerun_resumes(run_copy):
    config, workdir = run_copy
    config.total_steps = 10
    config.checkpoint_every_steps = 1
    config.log_every_steps = 1
    config.max_nonfinite_steps = 2
    sane = (config.optim.g_lr, config.optim.d_lr)
    config.optim.g_lr = config.optim.d_lr = 1e30
    with pytest.raises(RunFailed) as info:
        train(config, workdir)
    assert checked_steps(workdir) == [2, 4, 6]         # nothing diverged was saved
    assert "last good checkpoint is step 6" in str(info.value)
    config.optim.g_lr, config.optim.d_lr = sane        # as the message advises
    train(config, workdir)
    assert checked_steps(workdir) == [8, 9, 10]        # saved every step, the newest 3 kept


# -- one writer per workdir, SIGTERM ------------------------------------------------------------

def train_command(workdir, data_dir, steps):
    return [sys.executable, "-m", "rsjax.train", "--config", "fusion:demo,model=pix2pix",
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            f"--config.total_steps={steps}", "--config.global_batch_size=8", "--config.eval_batch_size=8",
            "--config.log_every_steps=1", "--config.image_every_steps=0", "--config.eval_every_steps=0",
            "--config.checkpoint_every_steps=1000", "--config.generator.ngf=4", "--config.discriminator.ndf=4"]


def test_second_writer_is_refused_and_sigterm_exits_143(demo_data_dir, tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.Popen(train_command(workdir, demo_data_dir, 100000), cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    stepping = threading.Event()

    def follow():                      # the log (progress lines too) and the result JSON: both here
        for line in first.stdout:
            lines.append(line)
            if re.search(r"\bstep \d+/\d+ .*steps/s", line):
                stepping.set()
    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 900
        while not stepping.wait(2):
            assert first.poll() is None and time.monotonic() < deadline, "".join(lines[-30:])
        second = subprocess.run(train_command(workdir, demo_data_dir, 10), cwd=ROOT, text=True,
                                capture_output=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {first.pid}" in second.stderr and "in use" in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(300) == 143, "".join(lines[-30:])
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    reader.join(30)
    text = "".join(lines)
    result = json.loads(text[text.rindex("\n{") + 1:])
    assert result["preempted"] is True
    # The step it stopped at was saved, and only it (no periodic checkpoint was due).
    stopped = steps_in(workdir)
    assert stopped == [result["step"]] and result["step"] > 0, "".join(lines[-30:])
    assert not (workdir / "rsjax.lock").exists()
