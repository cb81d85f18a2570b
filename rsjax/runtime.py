"""What a command does before its first JAX computation: the compilation cache
and joining a multi-host job. Cheap to import (JAX is imported when called).

`prepare_process` enables the cache (`compilation_cache_dir`) and, through
`maybe_initialize_distributed`, calls `jax.distributed.initialize` when the
environment names a coordinator (JAX_COORDINATOR_ADDRESS or RSJAX_COORDINATOR),
sets RSJAX_DISTRIBUTED=1, or comes from a launcher of several processes;
anything else runs as one process (RSJAX_DISTRIBUTED=0 forces that). Logging
is `rsjax.cli.setup_process`'s job; here only processes other than 0 of a
multi-host job have their INFO lines quieted.
docs/scaling.md ("Multi-host") gives the rules in order and the launchers.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping, Optional

from rsjax.errors import UserError

DEFAULT = "default"      # prepare_process's compilation cache: compilation_cache_dir()

# (JAX's name, rsjax's alias) of the three coordinator variables.
COORDINATOR = ("JAX_COORDINATOR_ADDRESS", "RSJAX_COORDINATOR")
NUM_PROCESSES = ("JAX_NUM_PROCESSES", "RSJAX_NUM_PROCESSES")
PROCESS_ID = ("JAX_PROCESS_ID", "RSJAX_PROCESS_ID")


def compilation_cache_dir() -> str:
    """Where compiled steps are kept between runs: $RSJAX_CACHE_DIR, else
    $XDG_CACHE_HOME/rsjax, else ~/.cache/rsjax (the `jax` folder inside), never a
    folder relative to the current directory."""
    base = os.environ.get("RSJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "rsjax")
    return os.path.join(os.path.abspath(os.path.expanduser(base)), "jax")


def prepare_process(compilation_cache: Optional[str] = DEFAULT) -> None:
    """What every command that runs a model does first: the compile cache, and
    joining a multi-host job when there is one (see the module docstring)."""
    enable_compilation_cache(compilation_cache)
    if maybe_initialize_distributed():
        import jax
        if jax.process_index() > 0:
            # Every host would print the same INFO lines; warnings and errors stay.
            logging.getLogger("rsjax").setLevel(logging.WARNING)


def enable_compilation_cache(directory: Optional[str] = DEFAULT) -> None:
    """Reuse compiled steps across runs (resume, evaluation, the experiment
    tables): compiling a GAN step costs a minute on a small CPU. A cache
    directory set already (JAX_COMPILATION_CACHE_DIR) is kept; None: none."""
    import jax

    if directory == DEFAULT:
        directory = compilation_cache_dir()
    if directory and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def cache_dir_in_use() -> Optional[str]:
    """The compilation cache folder this process uses (None: none)."""
    import jax

    return jax.config.jax_compilation_cache_dir or None


def _first(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[Optional[str], Optional[str]]:
    """(name, value) of the first of `names` set (non-empty) in `environ`."""
    for name in names:
        if environ.get(name):
            return name, environ[name]
    return None, None


def _count(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name) or 0)
    except ValueError:
        return 0


def distributed_arguments(environ: Mapping[str, str] = os.environ) -> Optional[dict]:
    """The keyword arguments of `jax.distributed.initialize` this process should
    join a job with ({} = JAX detects everything), or None to run alone."""
    switch = environ.get("RSJAX_DISTRIBUTED", "")
    if switch == "0":
        return None
    coordinator_var, coordinator = _first(environ, COORDINATOR)
    if coordinator:
        kwargs = {"coordinator_address": coordinator}
        for key, names in (("num_processes", NUM_PROCESSES), ("process_id", PROCESS_ID)):
            name, value = _first(environ, names)
            if value is None:
                continue
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise UserError(f"{name}={value}: expected a whole number.") from None
        missing = [names[0] for key, names in (("num_processes", NUM_PROCESSES),
                                               ("process_id", PROCESS_ID)) if key not in kwargs]
        if missing and not _launcher_detected(environ):
            raise UserError(
                f"{coordinator_var}={coordinator} is set but {' and '.join(missing)} "
                "is not: set the number of processes and this process's id (from 0) too "
                "(RSJAX_NUM_PROCESSES / RSJAX_PROCESS_ID are accepted as well).")
        return kwargs
    if switch not in ("", "0") or _launcher_detected(environ):
        return {}
    return None


def _launcher_detected(environ: Mapping[str, str]) -> bool:
    """A launcher that started several processes of one job, of a kind JAX's
    cluster detection (jax._src.clusters) reads the job's shape from."""
    slurm = "SLURM_STEP_NODELIST" in environ and _count(environ, "SLURM_NTASKS") > 1
    mpi = "OMPI_MCA_orte_hnp_uri" in environ and _count(environ, "OMPI_COMM_WORLD_SIZE") > 1
    gke_tpu = len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    return slurm or mpi or gke_tpu or bool(environ.get("CLOUD_TPU_TASK_ID"))


def maybe_initialize_distributed(environ: Mapping[str, str] = os.environ) -> bool:
    """Joins a multi-host job when the environment asks for one (see the module
    docstring); returns whether it did."""
    kwargs = distributed_arguments(environ)
    if kwargs is None:
        return False
    import jax

    _enable_cpu_collectives()
    jax.distributed.initialize(**kwargs)
    return True


def _enable_cpu_collectives() -> None:
    """Several CPU processes need a cross-process collectives library for their
    all-reduces (gradients, BatchNorm statistics); without one XLA fails at
    the first cross-process step. jax 0.10 defaults to gloo; an environment
    that turned it off ('none') gets it back. TPUs and GPUs ignore the option."""
    import jax

    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def workdir_path(workdir) -> str:
    """The run directory as a string every library takes: a local path made
    absolute (Orbax wants absolute paths), a URI (gs://bucket/run) unchanged.
    pathlib would turn 'gs://b/x' into 'gs:/b/x'; use etils.epath.Path(...) on
    the result to join and write."""
    text = os.fspath(workdir)
    return text if "://" in text else os.path.abspath(text)


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC 9B14") from /proc/cpuinfo where there is
    one; else what `platform` knows, which on Linux is often just "x86_64"."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features that decide which kernels XLA and numpy run (x86 and Arm names).
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
              "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve")


def cpu_flags() -> list[str]:
    """Which of SIMD_FLAGS /proc/cpuinfo lists (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in SIMD_FLAGS if flag in present]
    except OSError:
        pass
    return []


def host() -> dict:
    """The facts a benchmark or report records about the machine it ran on
    (the one place the commands get them from)."""
    import importlib.metadata
    import time

    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory = None
    return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
            "memory_gib": memory,
            "jax": importlib.metadata.version("jax"),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
