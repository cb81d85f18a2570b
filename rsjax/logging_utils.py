"""What a training run writes for people: metrics as JSON lines and, beside
them, TensorBoard event files (scalars and image grids), a progress line with
steps/s and ETA, and the run's config.

No TensorFlow and no clu (whose writers import TensorFlow): event files are
written by tensorboardX, a small pure-Python writer. In a multi-host
run only process 0 writes files or prints progress; the other processes get
writers that do nothing, so call sites need no `if process_index == 0`.

Paths go through etils.epath, so a workdir on Cloud Storage (gs://bucket/run,
with gcsfs installed) works like a local one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from etils import epath

log = logging.getLogger("rsjax")

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def _is_main_process() -> bool:
    return jax.process_index() == 0


def _is_remote(path) -> bool:
    return "://" in str(path)


class _RewritingAppender:
    """Append-only text file on object storage (GCS objects cannot be appended
    to): keeps the file's text and rewrites the whole object on each flush.
    Metrics files are small (a line per logged step), so this stays cheap."""

    def __init__(self, path: epath.Path):
        self._path = path
        self._text = path.read_text(encoding="utf-8") if path.exists() else ""

    def write(self, text: str) -> None:
        self._text += text

    def flush(self) -> None:
        self._path.write_text(self._text, encoding="utf-8")

    def close(self) -> None:
        self.flush()


def _to_json_number(name: str, value: Any) -> Optional[float | int]:
    """A scalar (Python, numpy or jax) as a JSON number; NaN/inf become null
    (strict JSON has no NaN; the non-finite step guard counts those anyway)."""
    array = np.asarray(jax.device_get(value))
    if array.size != 1:
        raise ValueError(f"metric '{name}' has shape {array.shape}; only scalars can be written. "
                         "Pass a {name: value} mapping (written as 'name/key') or one scalar per "
                         "entry instead.")
    item = array.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, int):
        return item
    item = float(item)
    return item if math.isfinite(item) else None


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict:
    """{'iou': {'water': 0.5}, 'loss': x} -> {'iou/water': 0.5, 'loss': x} (nested
    mappings of any kind: scores, metrics, configs with sep=".")."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}{sep}", sep=sep))
        else:
            flat[name] = value
    return flat


class MetricWriter:
    """Appends one JSON object per call to `<workdir>/metrics.jsonl`:

        {"step": 100, "time": 1764090000.0, "g_loss": 1.23, "d_loss": 0.45}

    `time` is Unix time in seconds. A resumed run appends to the same file;
    `resume_step` (the checkpoint it resumed from, 0 for a fresh start) first
    drops the lines of later steps, which the run is about to log again, and a
    last line cut short by a kill, so no step appears twice and no line is
    glued to a half-written one.

    The same scalars, and the images given to `write_images`, go to TensorBoard
    event files in the workdir (`tensorboard --logdir WORKDIR`; a resumed run
    adds a new event file, TensorBoard reads them all). NaN and inf are
    written to TensorBoard as they are (JSON gets null). `tensorboard=False`
    writes JSON lines only.
    """

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True,
                 filename: str = METRICS_FILE, resume_step: Optional[int] = None):
        self.workdir = epath.Path(os.fspath(workdir))
        self.path = self.workdir / filename
        self.enabled = _is_main_process()
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_metrics_after(self.path, resume_step)
        self._file = (_RewritingAppender(self.path) if _is_remote(self.path)
                      else self.path.open("a", encoding="utf-8"))
        if tensorboard:
            self._tb = _summary_writer(self.workdir)

    @property
    def has_tensorboard(self) -> bool:
        return self._tb is not None

    def write_scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Writes scalar metrics of `step` (nested mappings become 'a/b' names)."""
        if not self.enabled:
            return
        flat = flatten_metrics(metrics)
        values = {name: _to_json_number(name, v) for name, v in flat.items()}
        for reserved in ("step", "time"):
            if reserved in values:
                raise ValueError(f"'{reserved}' is reserved in {self.path.name}; rename that metric.")
        record = {"step": int(step), "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()          # a killed run keeps every line it logged
        if self._tb is not None:
            for name, value in values.items():
                if value is None:       # NaN or inf: TensorBoard can show which
                    value = float(np.asarray(jax.device_get(flat[name])).reshape(()))
                self._tb.add_scalar(name, value, global_step=int(step))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """(H, W, 3) uint8 images (e.g. `viz.render_grid`) to TensorBoard, stored
        there as PNG with the same pixels. The PNG files of a run are written by
        its trainer with rsjax.viz; this adds them to the event files."""
        if self._tb is None:
            return
        for name, image in images.items():
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image '{name}': expected (H, W, 3) uint8, got {image.dtype} "
                                 f"{image.shape}.")
            self._tb.add_image(name, image, global_step=int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def truncate_metrics_after(path: epath.Path, step: int) -> int:
    """Drops the lines of steps after `step` and an unfinished last line from a metrics file
    (rewritten whole, through a temporary file on a local disk); returns how many were dropped.

    Lines that are not records are kept as they are (`read_metrics` names them)."""
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    unfinished = lines.pop()                  # "" when the text ends with its newline
    kept = []
    for line in lines:
        try:
            record_step = json.loads(line).get("step") if line.strip() else None
        except (json.JSONDecodeError, AttributeError):
            record_step = None
        if not isinstance(record_step, int) or record_step <= step:
            kept.append(line)
    dropped = len(lines) - len(kept) + bool(unfinished)
    if dropped:
        new_text = "".join(line + "\n" for line in kept)
        if _is_remote(path):
            path.write_text(new_text, encoding="utf-8")
        else:
            tmp = path.parent / f".{path.name}.tmp"
            tmp.write_text(new_text, encoding="utf-8")
            os.replace(os.fspath(tmp), os.fspath(path))
        log.info("%s: dropped %d line(s) after step %d, which this run logs again.", path, dropped, step)
    return dropped


def _summary_writer(workdir: epath.Path):
    """tensorboardX's writer for the workdir. On Cloud Storage it needs
    google-cloud-storage (installed with gcsfs); without it the run goes on with
    JSON lines only, and says so."""
    import tensorboardX

    try:
        return tensorboardX.SummaryWriter(logdir=os.fspath(workdir))
    except ImportError as err:
        if not _is_remote(workdir):
            raise
        log.warning("No TensorBoard event files in %s (%s); metrics.jsonl has every metric.",
                    workdir, err)
        return None


def learning_rate_scalars(schedules: Mapping[str, Callable], step: int) -> dict:
    """{"learning_rate/<name>": rate} of each optax schedule for the update that
    made `step`: optax calls a schedule with the number of updates before it,
    so step s was made at schedule(s - 1). (A step skipped as non-finite does
    not advance optax's count; the few such steps a run survives are ignored.)"""
    return {f"learning_rate/{name}": float(schedule(max(int(step) - 1, 0)))
            for name, schedule in schedules.items()}


class StepRate:
    """Training steps per second between successive calls: wall-clock time,
    including whatever the loop did meanwhile (logging, images, validation,
    checkpoints), and the first call includes compilation."""

    def __init__(self, first_step: int = 0, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._last_step, self._last_time = int(first_step), clock()

    def __call__(self, step: int) -> float:
        now = self._clock()
        steps, seconds = int(step) - self._last_step, now - self._last_time
        self._last_step, self._last_time = int(step), now
        return steps / seconds if seconds > 0 else math.nan


def read_metrics(path: str | os.PathLike, dedupe: bool = True) -> list[dict]:
    """Records of a metrics.jsonl (a workdir or the file), in step order.

    With dedupe, records of the same step are merged, later lines winning (a
    resumed run rewrites the steps after its checkpoint). A last line without
    its newline (a run writing it now, or killed while writing) is left out;
    any other line that is not a JSON object is a ValueError naming it.
    """
    path = epath.Path(os.fspath(path))
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics file; is this a training workdir?")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]                 # unfinished: not a record yet
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON object ({err}).") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: expected an object with an integer 'step'.")
        records.append(record)
    if not dedupe:
        return records
    by_step: dict[int, dict] = {}
    for record in records:
        by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


# --------------------------------------------------------------------------- progress

def eta_seconds(steps_done: int, seconds: float, steps_left: int) -> Optional[float]:
    """Time left at the rate of `steps_done` steps in `seconds`; None when unknown."""
    if steps_left <= 0:
        return 0.0
    if steps_done <= 0 or seconds <= 0:
        return None
    return steps_left * seconds / steps_done


def format_duration(seconds: Optional[float]) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 7 -> '7s', None -> '?'."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _format_value(value: Any) -> str:
    number = _to_json_number("progress", value)
    if number is None:
        return "nan"
    if isinstance(number, int):
        return str(number)
    return f"{number:.4g}"


class ProgressReporter:
    """Prints `step 120/1000 (12.0%) | 2.31 steps/s | ETA 6m21s | g_loss=1.23 ...`.

    Call it after every step with the number of steps done; it prints at most
    once every `every_seconds` (and always at the first call and the last
    step), so it can sit in the loop. Steps/s is measured since the previous
    line, so it recovers quickly from the first step's compilation. Metrics are
    only pulled from the device when a line is printed; pass device values as
    they are. `first_step` is the step a resumed run starts from.
    """

    def __init__(self, total_steps: int, every_seconds: float = 30.0, first_step: int = 0,
                 print_fn: Optional[Callable[[str], None]] = None,
                 clock: Callable[[], float] = time.monotonic):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}.")
        self.total_steps = int(total_steps)
        self.every_seconds = float(every_seconds)
        self._print = print_fn or (lambda line: print(line, flush=True))
        self._clock = clock
        self._last_step = int(first_step)
        self._last_time = clock()
        self._printed_once = False
        self.enabled = _is_main_process()

    def restart(self, step: int) -> None:
        """Measure from `step` on (after a first step that carried the
        compilation), and print at the next call."""
        self._last_step, self._last_time, self._printed_once = int(step), self._clock(), False

    def __call__(self, step: int, metrics: Optional[Mapping[str, Any]] = None) -> Optional[str]:
        """Prints and returns the progress line when one is due, else returns None."""
        now = self._clock()
        due = (not self._printed_once or step >= self.total_steps
               or now - self._last_time >= self.every_seconds)
        if not due or not self.enabled:
            return None
        steps, seconds = step - self._last_step, now - self._last_time
        rate = steps / seconds if steps > 0 and seconds > 0 else None
        parts = [f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)",
                 f"{rate:.3g} steps/s" if rate else "? steps/s",
                 f"ETA {format_duration(eta_seconds(steps, seconds, self.total_steps - step))}"]
        if metrics:
            parts.append(" ".join(f"{k}={_format_value(v)}"
                                  for k, v in flatten_metrics(metrics).items()))
        line = " | ".join(parts)
        self._print(line)
        self._last_step, self._last_time, self._printed_once = step, now, True
        return line


# --------------------------------------------------------------------------- config

def _config_as_dict(config: Any) -> Any:
    if hasattr(config, "to_dict"):                     # ml_collections ConfigDict / FrozenConfigDict
        return config.to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"cannot write a config of type {type(config).__name__}; pass a ConfigDict, "
                    "a dataclass or a dict.")


def write_config(config: Any, workdir: str | os.PathLike,
                 filename: str = CONFIG_FILE) -> Optional[epath.Path]:
    """Writes the run's config as indented JSON to `<workdir>/config.json` (process 0
    only; returns the path there, None elsewhere). Values JSON cannot hold are
    written with str(); the file is replaced atomically, so a reader never sees
    half a config."""
    if not _is_main_process():
        return None
    workdir = epath.Path(os.fspath(workdir))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / filename
    text = json.dumps(_config_as_dict(config), indent=2, sort_keys=True, default=str)
    if _is_remote(path):
        path.write_text(text + "\n", encoding="utf-8")   # an object upload is atomic already
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
