"""One process of the multi-host test (tests/test_multihost.py): a few steps of
the tiny fusion training, with a record of every file this process wrote.

    python tests/multihost_train.py DATA_DIR WORKDIR REPORT.json [--final_eval]

Run it with RSJAX_COORDINATOR / RSJAX_NUM_PROCESSES / RSJAX_PROCESS_ID set to
join a multi-process job (or without them for one process), and XLA_FLAGS
giving the local device count. The record comes from Python's audit hooks
(every `open` for writing, mkdir, rename and remove, whoever calls it: PIL,
matplotlib, json, pathlib), so the test sees what this process really wrote,
not what the code says it writes. Orbax's checkpoint files are left out of
the verdict by the test: all processes write checkpoints together.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"}


def record_writes_under(root: str) -> list[str]:
    """Starts recording the paths under `root` that this process writes; returns
    the (growing) list."""
    root = os.path.abspath(root)
    written: list[str] = []

    def under_root(path) -> str | None:
        if isinstance(path, int):
            return None                       # an already open descriptor
        path = os.path.abspath(os.fsdecode(path))
        return path if path == root or path.startswith(root + os.sep) else None

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                       else bool(flags & _WRITE_FLAGS))
            if writing and (hit := under_root(path)):
                written.append(hit)
        elif event in _PATH_EVENTS:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and (hit := under_root(path)):
                    written.append(hit)

    sys.addaudithook(hook)
    return written


def main(data_dir: str, workdir: str, report: str, final_eval: bool) -> None:
    written = record_writes_under(workdir)
    import jax

    from rsjax import cli
    from rsjax.runtime import prepare_process
    from rsjax.trainers import fusion
    from trainer_utils import tiny_fusion_config

    cli.setup_process()          # logging, as every command has it
    prepare_process()            # joins the job from RSJAX_* (and picks gloo on CPU)
    config = tiny_fusion_config(data_dir, "pix2pix", steps=4)
    config.global_batch_size = 4
    config.eval_batch_size = 4
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.image_every_steps = 2 if final_eval else 0
    config.final_eval_split = "test" if final_eval else ""
    result = fusion.train_and_evaluate(config, workdir)
    Path(report).write_text(json.dumps({
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(), "devices": jax.device_count(),
        "result": {k: float(v) for k, v in result.items() if isinstance(v, (int, float))},
        "written": sorted(set(written))}, indent=1))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 3:
        sys.exit(__doc__)
    main(*args, final_eval="--final_eval" in sys.argv)
