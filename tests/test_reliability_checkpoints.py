"""Checkpoints a crash cannot make trusted wrongly: a step's checksums follow its commit at
once, a step without them is unverified (warned about, its values checked, never named the
last good one), and a run whose final state was not saved exits non-zero."""
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rsjax import train as train_command
from rsjax.errors import RunFailed
from rsjax.trainers import integrity
from rsjax.trainers.checkpoints import Checkpointer, abstract_like
from trainer_utils import largest_data_file, overwrite_middle, tiny_fusion_config


def small_state(value=1.0):
    return {"model": {"w": jnp.full((4,), value, jnp.float32)}, "step": jnp.int32(0)}


def step_dir(workdir, step):
    return workdir / "checkpoints" / str(step)


def test_a_step_gets_its_checksums_without_waiting_for_the_next_save(tmp_path):
    ckpt = Checkpointer(tmp_path, every_steps=10, keep=3)
    try:
        assert ckpt.save(10, small_state())
        ckpt.manager.wait_until_finished()       # Orbax has committed step 10
        ckpt.save(11, small_state())             # the loop's next step, not a save step
        # A SIGKILL now used to leave step 10 without checksums until the save at step 20.
        assert integrity.has_manifest(step_dir(tmp_path, 10))
    finally:
        ckpt.close()


def checkpoints_10_and_20(workdir, state20):
    """Step 10 with checksums; step 20 as a run killed between its commit and its checksums
    left it (written straight through Orbax, as `save` would refuse a bad state)."""
    ckpt = Checkpointer(workdir, every_steps=10, keep=3)
    ckpt.save(10, small_state())
    ckpt.wait()
    ckpt.manager.save(20, args=ocp.args.Composite(state=ocp.args.StandardSave(state20)))
    ckpt.manager.close()
    assert integrity.has_manifest(step_dir(workdir, 10)) and not integrity.has_manifest(step_dir(workdir, 20))


def test_a_step_without_checksums_is_restored_with_a_warning_but_never_the_last_good(tmp_path, caplog):
    checkpoints_10_and_20(tmp_path, small_state(2.0))
    ckpt = Checkpointer(tmp_path, every_steps=10, keep=3)
    try:
        with caplog.at_level("WARNING", logger="rsjax"):
            state, step = ckpt.restore(abstract_like(small_state()))
        assert step == 20 and float(state["model"]["w"][0]) == 2.0
        assert any("step 20" in r.getMessage() and "no checksums" in r.getMessage()
                   for r in caplog.records), caplog.text
        assert ckpt.last_good_step() == 10
    finally:
        ckpt.close()


def test_a_step_without_checksums_holding_nan_falls_back(tmp_path, caplog):
    checkpoints_10_and_20(tmp_path, small_state(float("nan")))
    ckpt = Checkpointer(tmp_path, every_steps=10, keep=3)
    try:
        with caplog.at_level("WARNING", logger="rsjax"):
            state, step = ckpt.restore(abstract_like(small_state()))
        assert step == 10 and np.isfinite(np.asarray(state["model"]["w"])).all()
        assert "step 20" in caplog.text and "non-finite" in caplog.text, caplog.text
    finally:
        ckpt.close()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_damaged_step_without_checksums_is_not_called_the_last_good(run6, tmp_path, caplog):
    from rsjax.trainers import get_trainer

    config, original = run6
    config = config.copy_and_resolve_references()      # the fixture is shared: change a copy
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    # SIGKILL after step 6 was committed, before its checksums; then its bytes changed.
    (step_dir(workdir, 6) / integrity.MANIFEST).unlink()
    overwrite_middle(largest_data_file(workdir, 6))
    config.total_steps = 10
    config.checkpoint_every_steps = config.log_every_steps = 1
    config.max_nonfinite_steps = 2
    config.optim.g_lr = config.optim.d_lr = 1e30
    with caplog.at_level("INFO", logger="rsjax"), pytest.raises(RunFailed) as info:
        get_trainer(config.trainer)(config, str(workdir))
    assert "step 6" in caplog.text and "no checksums" in caplog.text, caplog.text
    assert "last good checkpoint is step 4" in str(info.value), str(info.value)
    assert "stays step 6" not in caplog.text


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_run_that_diverges_without_stopping_exits_1(demo_data_dir, tmp_path, capsys):
    # lr 1e30 for 3 steps: too few for max_nonfinite_steps to stop it, and nothing may be saved.
    code = train_command.main([
        "--config", "fusion:demo,model=pix2pix", "--workdir", str(tmp_path / "run"),
        f"--config.data.data_dir={demo_data_dir}", "--config.total_steps=3",
        "--config.global_batch_size=8", "--config.eval_batch_size=8", "--config.log_every_steps=1",
        "--config.image_every_steps=0", "--config.eval_every_steps=0",
        "--config.checkpoint_every_steps=1000", "--config.generator.ngf=4",
        "--config.discriminator.ndf=4", "--config.optim.g_lr=1e30", "--config.optim.d_lr=1e30"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1, err[-2000:]
    assert len(errors) == 1 and "without saving its final state" in errors[0], err[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "run" / "checkpoints").iterdir())


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_path(demo_data_dir, mount_tmpfs):
    """Issue 28: a disk that fills during an asynchronous save used to print 4,766
    stderr lines and 744 tracebacks from Orbax's threads before a line naming no path.
    A real 3 MiB file system: the first checkpoint (about 1.9 MiB) fits, the second does not."""
    import subprocess
    import sys

    disk = mount_tmpfs("3m")
    workdir = disk / "run"
    done = subprocess.run([
        sys.executable, "-m", "rsjax.train", "--config", "fusion:demo,model=pix2pix",
        "--workdir", str(workdir), f"--config.data.data_dir={demo_data_dir}",
        "--config.total_steps=4", "--config.global_batch_size=8", "--config.eval_batch_size=8",
        "--config.log_every_steps=1", "--config.image_every_steps=0", "--config.eval_every_steps=0",
        "--config.checkpoint_every_steps=1", "--config.generator.ngf=4", "--config.discriminator.ndf=4"],
        capture_output=True, text=True, timeout=600)
    err = done.stderr
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert done.returncode == 1, err[-3000:]
    assert len(errors) == 1 and "disk is full" in errors[0], err[-3000:]
    assert f"writing {workdir}/checkpoints/" in errors[0] and "MiB free there" in errors[0], errors[0]
    assert "a checkpoint of this run takes" in errors[0], errors[0]
    assert "Traceback" not in err and len(err.splitlines()) < 20, err[-3000:]
    # What was committed before the disk filled is intact, and the lock is gone.
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and integrity.verify(step_dir(workdir, steps[-1])) is None
    assert not (workdir / "rsjax.lock").exists()


def test_only_the_configured_steps_are_saved(tmp_path):
    """Every `checkpoint_every_steps` (and on preemption or at the end, by `force`):
    not also the first step, as Orbax's default policy would."""
    ckpt = Checkpointer(tmp_path, every_steps=3, keep=5)
    for step in range(1, 8):
        ckpt.save(step, small_state(float(step)))
    ckpt.close()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]


def test_saving_a_replicated_state_on_cpu_devices_compiles_nothing(tmp_path):
    """Orbax's replica-parallel writing sliced each replicated array on every
    device: one compilation per device and shape (232 for the tiny demo model on
    8 CPU devices, about 10 s between the first steps of every run)."""
    import jax

    devices = jax.devices()
    assert len(devices) == 8
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put({"model": {f"w{i}": jnp.full((16 + i,), 1.0, jnp.float32) for i in range(6)},
                            "step": jnp.int32(0)}, replicated)
    assert integrity.unsafe_to_save(state) is None     # compiles the finiteness check before counting
    compiled = []

    def listener(event, seconds, **kwargs):
        if "backend_compile" in event:
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        ckpt = Checkpointer(tmp_path, every_steps=1, keep=2)
        ckpt.save(1, state)
        ckpt.close()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiled == [], f"{len(compiled)} compilations while saving"


@pytest.mark.parametrize("group_values", [1 << 24, 5])     # one group, and a group per leaf or two
def test_what_may_be_saved_is_judged_over_every_leaf(monkeypatch, group_values):
    monkeypatch.setattr(integrity, "CHECK_GROUP_VALUES", group_values)

    def state(**changes):
        base = {"g": {"w": jnp.ones((3,)), "b": jnp.zeros((2,), jnp.bfloat16)},
                "g_opt": {"mu": jnp.full((4,), 1e12)}, "step": jnp.int32(3)}
        for path, value in changes.items():
            group, leaf = path.split("__")
            base[group] = {**base[group], leaf: value}
        return base

    assert integrity.unsafe_to_save(state()) is None        # large optimizer moments are fine
    assert "non-finite" in integrity.unsafe_to_save(state(g_opt__mu=jnp.array([1.0, jnp.nan, 0.0, 0.0])))
    assert "non-finite" in integrity.unsafe_to_save(state(g__b=jnp.array([jnp.inf, 0.0], jnp.bfloat16)))
    assert "non-finite" in integrity.unsafe_to_save(state(g__w=jnp.array([-jnp.inf, 0.0, 0.0])))
    assert "1e+09" in integrity.unsafe_to_save(state(g__w=jnp.array([0.0, -1e9, 0.0])))
