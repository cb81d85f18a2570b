"""What produced a result: the code (commit, clean or not), the library
versions that compute, the dataset's fingerprint, the thread settings and the
machine. Experiment runs keep it in their records so that a number can be
traced to what made it, and runs made by different code can be told apart."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
from pathlib import Path
from typing import Optional

from rsjax import runtime

# The distributions whose versions can change a number rsjax computes.
COMPUTING_PACKAGES = ("rsjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                      "scipy", "rasterio", "grain", "tensorflow-datasets", "dm-pix")
# Environment variables that set threads or XLA's compilation.
THREAD_VARIABLES = ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "TF_NUM_INTRAOP_THREADS", "JAX_PLATFORMS", "JAX_ENABLE_X64")


def package_versions() -> dict[str, Optional[str]]:
    """{distribution: version} of COMPUTING_PACKAGES (None where not installed)."""
    versions = {}
    for name in COMPUTING_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code() -> dict:
    """{"commit", "clean"} of the git checkout rsjax runs from; both None for an
    installed copy without one (its version is in `package_versions`)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    if not (root / ".git").exists():
        return {"commit": None, "clean": None}
    commit = git("rev-parse", "HEAD")
    # Tracked files only: untracked work folders do not change what the code computes.
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip() if commit else None,
            "clean": None if status is None else status.strip() == ""}


def dataset_fingerprint(data_cfg) -> Optional[dict]:
    """{"name", "version", "sha256"} of a built TFDS dataset: the hash of its
    dataset_info.json's splits (shard lengths and bytes) and config, which
    change with any tile; None where the dataset is not built."""
    from rsjax import input_pipeline

    builder = input_pipeline.get_builder(data_cfg)
    info_file = Path(builder.data_dir) / "dataset_info.json"
    if not info_file.exists():
        return None
    info = json.loads(info_file.read_text())
    content = {k: info.get(k) for k in ("name", "version", "configName", "splits")}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return {"name": f"{info.get('name')}/{info.get('configName')}", "version": info.get("version"),
            "sha256": digest}


def threads() -> dict:
    """The process's CPU affinity and the thread and XLA variables set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    return {"cores_usable": cores,
            "environment": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ}}


def record(data_cfg=None) -> dict:
    """Everything above, for a run's record (`data_cfg`: its dataset, if any)."""
    out = {"code": code(), "packages": package_versions(), "threads": threads(),
           "machine": runtime.host()}
    if data_cfg is not None:
        out["dataset"] = dataset_fingerprint(data_cfg)
    return out


def differences(records: list[dict]) -> dict[str, list]:
    """{field: the distinct values} of the code and package fields that differ
    between run records (their `provenance`); empty when they agree. Records
    without provenance (older runs) count as None."""
    fields: dict[str, set] = {}
    for r in records:
        p = r.get("provenance") or {}
        values = {"commit": (p.get("code") or {}).get("commit"),
                  **{f"package {k}": v for k, v in (p.get("packages") or {}).items()},
                  "dataset": (p.get("dataset") or {}).get("sha256")}
        for k, v in values.items():
            fields.setdefault(k, set()).add(v)
    return {k: sorted(v, key=str) for k, v in fields.items() if len(v) > 1}


def difference_lines(differ: dict[str, list]) -> list[str]:
    """Markdown lines saying what `differences` found (none when nothing differs)."""
    if not differ:
        return []
    return ["", "The finished runs were not all made by the same code, libraries or data "
                "(each run.json holds its `provenance`):", "",
            *(f"- {k}: {', '.join(str(v) for v in values)}" for k, values in differ.items()), ""]
