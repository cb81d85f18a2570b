"""The device mesh and where state and batches live on it.

Pure data parallelism: one `data` axis over every device of every process.
Train state is replicated; batches are split over `data` on their leading
axis. The same code runs on 1 CPU, 8 fake CPU devices, a GPU and a multi-host
TPU slice.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rsjax.errors import ConfigError

DATA_AXIS = "data"


def create_mesh(devices=None) -> Mesh:
    """One `data` axis over every device of every process (or the `devices`
    given, e.g. a subset in tests)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the `data` axis, everything else whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if global_batch_size % n:
        raise ConfigError(
            f"config.global_batch_size={global_batch_size} is not divisible by the {n} devices "
            f"of this run. Set --config.global_batch_size to a multiple of {n}.")


# A program that runs once (initialization) is not worth XLA:CPU's backend
# optimizations: the demo RS-SPADE's init_state compiles in 21.7 s with them and
# 11.6 s without, and runs in 0.5 s instead of 0.1 s (rsjax bench steps --parts
# startup, 2026-12-07, 2-core AMD EPYC). Values differ from the optimized
# program's by float32 round-off (contracted multiply-adds), the same on every run.
ONE_SHOT_CPU_OPTIONS = {"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True}


def one_shot_compiler_options(mesh: Mesh) -> dict | None:
    """XLA options for a program run once on `mesh` (None: the defaults; GPUs and
    TPUs compile it fast enough as it is)."""
    return ONE_SHOT_CPU_OPTIONS if mesh.devices.flat[0].platform == "cpu" else None


def init_replicated(init_fn, mesh: Mesh):
    """`init_fn()`'s state created directly replicated on the mesh (no host copy
    and broadcast: every device builds its own copy inside one jit, compiled
    for speed of compiling: see ONE_SHOT_CPU_OPTIONS)."""
    out_sh = jax.tree.map(lambda _: replicated(mesh), jax.eval_shape(init_fn))
    return jax.jit(init_fn, out_shardings=out_sh,
                   compiler_options=one_shot_compiler_options(mesh))()


def abstract_replicated(init_fn, mesh: Mesh):
    """Shapes, dtypes and replicated shardings of `init_fn()`'s state, allocating
    nothing: the target a checkpoint from any device count is restored into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)),
                        jax.eval_shape(init_fn))


def gather_to_host(tree):
    """Global jax.Arrays -> numpy arrays holding the whole global value, on every
    process. A batch sharded over several hosts is not addressable by any one of
    them (np.asarray raises), so its shards are all-gathered first. Collective
    on multi-host runs: every process must call it, with the same tree.
    Dicts keep their key order (jax.tree.map would sort it), so an image
    grid's rows stay in the order they were given."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return _in_key_order_of(tree, jax.tree.map(one, tree))


def _in_key_order_of(like, tree):
    """`tree` (a jax.tree.map result: dict keys sorted) with the dict key order of `like`."""
    if isinstance(like, dict):
        return {k: _in_key_order_of(like[k], tree[k]) for k in like}
    if isinstance(like, (list, tuple)) and not hasattr(like, "_fields"):
        return type(like)(_in_key_order_of(a, b) for a, b in zip(like, tree))
    return tree
