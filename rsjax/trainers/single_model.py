"""What the one-model trainers (segmentation, cloud removal) share in their
Setup: the model's train and eval graphs, the learning-rate schedule, the
optimizer, a per-run cache of jitted functions and the initial train state.
A trainer subclasses `SingleModelSetup`, defines `_create()` (its model) and
calls `_build(lr, make_tx)` at the end of its own `__init__`. The fusion
trainer's two networks have their own Setup."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rsjax.errors import ConfigError
from rsjax.trainers import loop


# config.dtype: the dtype the train step computes in. Parameters, optimizer
# state and BatchNorm's statistics stay float32; the loss is taken in float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config):
    """`config.dtype` (default float32) as a JAX dtype; another name is a ConfigError."""
    dtype = config.get("dtype", "float32")
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"config.dtype={dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}.")
    return COMPUTE_DTYPES[dtype]


class SingleModelSetup:
    config = None            # the run's ConfigDict, set by the subclass

    def _create(self) -> nnx.Module:
        raise NotImplementedError

    def _build(self, lr: float, make_tx: Callable[[optax.Schedule], optax.GradientTransformation]):
        self.compute_dtype = compute_dtype(self.config)   # float16 or a typo: a ConfigError here
        # An abstract model: only its graph definitions are needed here (a real
        # one would compile every layer's initializer eagerly, one by one).
        model = nnx.eval_shape(self._create)
        model.train()
        self.train_graph, _ = nnx.split(model)
        model.eval()
        self.eval_graph, _ = nnx.split(model)
        schedule = loop.learning_rate_schedule(lr, self.config.total_steps,
                                               self.config.optim.decay_start_step)
        self.learning_rates = {"model": schedule}      # logged as learning_rate/model
        self.tx = make_tx(schedule)
        self._jitted = {}

    def jitted(self, name: str, fn):
        """`jax.jit(fn)`, compiled once per run under `name` (not at every evaluation)."""
        if name not in self._jitted:
            self._jitted[name] = jax.jit(fn)
        return self._jitted[name]

    def init_state(self) -> dict:
        model = self._create()
        model.train()
        return {"step": jnp.zeros((), jnp.int32), "model": nnx.state(model),
                "opt": self.tx.init(nnx.state(model, nnx.Param)),
                "nonfinite": jnp.zeros((), jnp.int32)}
