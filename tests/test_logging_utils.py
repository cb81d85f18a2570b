"""Metric writer, progress line and config file."""
import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rsjax import logging_utils


def test_metric_writer_writes_json_lines(tmp_path):
    with logging_utils.MetricWriter(tmp_path / "run", tensorboard=False) as writer:
        writer.write_scalars(1, {"g_loss": jnp.float32(1.5), "d_loss": np.float64(0.25),
                                 "skipped_steps": jnp.int32(2)})
        writer.write_scalars(2, {"g_loss": float("nan"), "iou": {"water": 0.5, "trees": 0.75},
                                 "finite": jnp.bool_(True)})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    first, second = (json.loads(line) for line in lines)     # strict JSON, one object a line
    assert first["step"] == 1 and first["g_loss"] == 1.5 and first["d_loss"] == 0.25
    assert first["skipped_steps"] == 2 and isinstance(first["skipped_steps"], int)
    assert isinstance(first["time"], float)
    assert second["g_loss"] is None                          # NaN -> null
    assert second["iou/water"] == 0.5 and second["iou/trees"] == 0.75
    assert second["finite"] == 1
    assert "NaN" not in lines[1]


def test_resumed_run_appends_and_reader_keeps_last_record_per_step(tmp_path):
    with logging_utils.MetricWriter(tmp_path) as writer:
        writer.write_scalars(10, {"loss": 3.0})
        writer.write_scalars(20, {"loss": 2.0})
    with logging_utils.MetricWriter(tmp_path) as writer:     # resumed from step 10
        writer.write_scalars(20, {"loss": 1.9, "psnr": 20.0})
    assert len(logging_utils.read_metrics(tmp_path, dedupe=False)) == 3
    records = logging_utils.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [10, 20]
    assert records[1]["loss"] == 1.9 and records[1]["psnr"] == 20.0


def test_metric_writer_rejects_arrays_and_reserved_names(tmp_path):
    with logging_utils.MetricWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="'per_class_iou' has shape"):
            writer.write_scalars(1, {"per_class_iou": np.zeros(9)})
        with pytest.raises(ValueError, match="'step' is reserved"):
            writer.write_scalars(1, {"step": 3})


def test_tensorboard_event_files_hold_the_scalars_and_images(tmp_path):
    """Read back with an independent TFRecord reader (CRCs checked): tags, steps,
    values, and the image's pixels."""
    from event_files import crc32c, read_events

    assert crc32c(b"123456789") == 0xE3069283          # the reader's CRC-32C: the check value
    grid = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    with logging_utils.MetricWriter(tmp_path) as writer:          # event files by default
        assert writer.has_tensorboard
        writer.write_scalars(2, {"loss": jnp.float32(1.5), "iou": {"water": 0.25},
                                 "learning_rate/generator": 2e-4, "bad": float("inf")})
        writer.write_scalars(4, {"loss": 0.75})
        writer.write_images(4, {"images": grid})
        with pytest.raises(ValueError, match="image 'floats'"):
            writer.write_images(4, {"floats": grid / 255.0})
    events = read_events(tmp_path)
    scalars = events["scalars"]
    assert scalars["loss"] == [(2, 1.5), (4, 0.75)]
    assert scalars["iou/water"] == [(2, 0.25)]
    assert scalars["learning_rate/generator"] == [(2, pytest.approx(2e-4))]
    assert scalars["bad"] == [(2, float("inf"))]                  # null in JSON, inf here
    [(step, image)] = events["images"]["images"]
    assert step == 4 and np.array_equal(image, grid)               # PNG: the same pixels
    assert logging_utils.read_metrics(tmp_path)[0]["bad"] is None  # JSON lines stay beside


def test_tensorboard_off_writes_json_lines_only(tmp_path):
    with logging_utils.MetricWriter(tmp_path, tensorboard=False) as writer:
        assert not writer.has_tensorboard
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_images(1, {"grid": np.zeros((8, 8, 3), np.uint8)})   # ignored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_learning_rate_scalars_and_step_rate():
    import optax

    schedule = optax.linear_schedule(1.0, 0.0, transition_steps=10)
    # Step 1 was made by optax's first update, at count 0.
    assert logging_utils.learning_rate_scalars({"model": schedule}, 1) == {"learning_rate/model": 1.0}
    assert logging_utils.learning_rate_scalars({"g": schedule, "d": schedule}, 6) == {
        "learning_rate/g": pytest.approx(0.5), "learning_rate/d": pytest.approx(0.5)}
    clock = FakeClock()
    rate = logging_utils.StepRate(first_step=10, clock=clock)
    clock.now += 4.0
    assert rate(30) == 5.0                                  # 20 steps in 4 s
    clock.now += 1.0
    assert rate(31) == 1.0                                  # since the previous call only


def test_eta_and_duration_formatting():
    assert logging_utils.eta_seconds(steps_done=10, seconds=5.0, steps_left=100) == 50.0
    assert logging_utils.eta_seconds(0, 5.0, 100) is None
    assert logging_utils.eta_seconds(10, 5.0, 0) == 0.0
    assert logging_utils.format_duration(3725) == "1h02m05s"
    assert logging_utils.format_duration(65) == "1m05s"
    assert logging_utils.format_duration(7.4) == "7s"
    assert logging_utils.format_duration(None) == "?"


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_reporter_rate_limits_and_computes_eta():
    clock, printed = FakeClock(), []
    report = logging_utils.ProgressReporter(total_steps=1000, every_seconds=30, print_fn=printed.append,
                                            clock=clock)
    clock.now += 20.0                                        # first step, with compilation
    line = report(1, {"g_loss": jnp.float32(1.23456)})
    assert line == "step 1/1000 (0.1%) | 0.05 steps/s | ETA 5h33m00s | g_loss=1.235"
    clock.now += 10.0
    assert report(11) is None                                # too soon: nothing printed
    clock.now += 30.0                                        # 199 steps in 40 s since the last line
    line = report(200, {"d_loss": 0.5, "psnr": float("nan")})
    assert line == "step 200/1000 (20.0%) | 4.97 steps/s | ETA 2m41s | d_loss=0.5 psnr=nan"
    clock.now += 1.0
    assert report(1000).startswith("step 1000/1000 (100.0%) | 800 steps/s | ETA 0s")  # last step always
    assert len(printed) == 3


def test_progress_reporter_resumed_run_counts_from_first_step():
    clock, printed = FakeClock(), []
    report = logging_utils.ProgressReporter(100, first_step=50, print_fn=printed.append, clock=clock)
    clock.now += 10.0
    assert report(60) == "step 60/100 (60.0%) | 1 steps/s | ETA 40s"
    with pytest.raises(ValueError, match="total_steps"):
        logging_utils.ProgressReporter(0)


def test_write_config(tmp_path):
    config = ml_collections.ConfigDict({"model": {"name": "spade", "ngf": 64},
                                        "sources": ("lulc", "s1"), "lr": 1e-4})
    path = logging_utils.write_config(config, tmp_path / "run")
    assert path == tmp_path / "run" / "config.json"
    loaded = json.loads(path.read_text())
    assert loaded == {"model": {"name": "spade", "ngf": 64}, "sources": ["lulc", "s1"], "lr": 1e-4}
    assert not list((tmp_path / "run").glob("*.tmp"))
    with pytest.raises(TypeError, match="ConfigDict"):
        logging_utils.write_config(42, tmp_path)


def test_object_storage_appender_keeps_earlier_lines(tmp_path):
    """On gs:// (objects cannot be appended to) metrics are rewritten whole on each
    flush: a resumed run's writer must keep the lines already there."""
    from etils import epath

    path = epath.Path(tmp_path) / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    appender = logging_utils._RewritingAppender(path)
    appender.write('{"step": 2}\n')
    assert path.read_text() == '{"step": 1}\n'            # nothing uploaded before a flush
    appender.flush()
    appender.write('{"step": 3}\n')
    appender.close()
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    assert [r["step"] for r in logging_utils.read_metrics(path)] == [1, 2, 3]


def test_read_metrics_skips_a_line_being_written_and_names_a_bad_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')     # a run writing step 2
    assert logging_utils.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        logging_utils.read_metrics(tmp_path)
    path.write_text('{"loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: expected an object with an integer 'step'"):
        logging_utils.read_metrics(path)


def test_resumed_writer_drops_the_steps_it_logs_again_and_a_half_written_line(tmp_path):
    """A run killed after logging step 30 but checkpointed at 20 resumes at 20: steps 21..30 are
    logged again, so their old lines go; a line cut short by the kill is not glued to the next."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (10, 20, 30))
                    + '{"step": 40, "lo')
    with logging_utils.MetricWriter(tmp_path, tensorboard=False, resume_step=20) as writer:
        writer.write_scalars(30, {"loss": -30.0})
    records = logging_utils.read_metrics(tmp_path, dedupe=False)
    assert [(r["step"], r["loss"]) for r in records] == [(10, 10.0), (20, 20.0), (30, -30.0)]
