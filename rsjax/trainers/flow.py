"""The rectified-flow generator's training step and sampler, behind the fusion
trainer (`--config fusion:demo,model=flow`).

`Setup` offers what the fusion trainer asks of its GAN Setup, so the fusion
trainer's loop, evaluation, checkpoints and inference serve the flow model
unchanged; only the step (`train_step`) and how an image is made
(`generate`: a few ODE steps from noise) are its own. Sampling is
deterministic for a given `seed` (`sampling_noise`; whole scenes take
`grid_noise`, a function of the seed and the pixel's place in the scene).
docs/training.md ("The flow generator's trainer") gives the EMA warm-up and
the noise conventions.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rsjax import config_checks, input_pipeline, losses
from rsjax.models import create_model
from rsjax.models import flow as flow_model
from rsjax.trainers import loop
from rsjax.trainers.nonfinite import guarded_model_step
from rsjax.trainers.single_model import SingleModelSetup

# The sampling noise's stream, apart from the seed's other uses (training noise: fold_in(step)).
_SAMPLING_STREAM = 2**31 - 1


def is_flow(config) -> bool:
    """Whether a fusion config's generator is the flow model."""
    return str(config.generator.name) == "flow_unet"


class Setup(SingleModelSetup):
    """The flow model's graph definitions, optimizer and config."""

    def __init__(self, config, sources):
        self.config = config
        self.sources = tuple(sources)
        self.generator_name = str(config.generator.name)
        config_checks.check_flow(config)       # as `rsjax train` checks it, for library callers
        o = config.optim
        self._build(o.lr, lambda lr: optax.adam(lr, b1=o.b1, b2=o.b2))
        self._generate = {}

    def _create(self):
        kw = dict(self.config.generator.to_dict())
        name = kw.pop("name")
        channels = {s: input_pipeline.SOURCE_CHANNELS[s] for s in self.sources}
        return create_model(name, source_channels=channels,
                            out_channels=int(self.config.out_channels),
                            rngs=nnx.Rngs(params=int(self.config.seed)), **kw)

    def init_state(self) -> dict:
        model = self._create()
        model.train()
        params = nnx.state(model, nnx.Param)
        return {"step": jnp.zeros((), jnp.int32), "model": nnx.state(model),
                "opt": self.tx.init(params), "ema": jax.tree.map(jnp.copy, params),
                "nonfinite": jnp.zeros((), jnp.int32)}

    def generate_jit(self, use_ema: bool):
        """The jitted sampler, (state, batch) -> image, compiled once per run."""
        if use_ema not in self._generate:
            self._generate[use_ema] = jax.jit(functools.partial(generate, self, use_ema=use_ema))
        return self._generate[use_ema]


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """The EMA decay after `step` updates: min(decay, (1 + step) / (10 + step))."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(setup: Setup, state: dict, batch: dict):
    """One flow-matching step: noise and a time per image, the point x_t on the
    straight path from the noise to the image, and the squared error of the
    predicted velocity against image - noise over valid pixels."""
    f = setup.config.flow
    cd = setup.compute_dtype
    key = jax.random.fold_in(jax.random.key(int(setup.config.seed)), state["step"])
    k_noise, k_time = jax.random.split(key)
    image = batch["image"].astype(jnp.float32)
    noise = jax.random.normal(k_noise, image.shape, jnp.float32)
    t = flow_model.sample_times(k_time, image.shape[0], f.time_sampling)
    x_t = flow_model.interpolate(noise, image, t)
    sources = {s: batch[s].astype(cd) for s in setup.sources}

    def loss_of_model(model):
        velocity = model(x_t.astype(cd), t, sources).astype(jnp.float32)
        return losses.l2_loss(velocity, image - noise, batch["valid"]), None

    new_state, loss, _ = guarded_model_step(setup, state, loss_of_model, cd)
    # A skipped (non-finite) step leaves the parameters as they were; the EMA
    # then moves towards those same parameters, which is harmless.
    params = nnx.state(nnx.merge(setup.train_graph, new_state["model"]), nnx.Param)
    decay = ema_decay_at(state["step"], float(setup.config.ema_decay))
    new_state["ema"] = loop.ema_update(state["ema"], params, decay)
    return new_state, {"loss": loss, "nonfinite": new_state["nonfinite"].astype(jnp.float32)}


def sampling_noise(seed: int, shape) -> jax.Array:
    """The starting noise of `seed`'s samples, of `shape` (B, H, W, C)."""
    return jax.random.normal(jax.random.fold_in(jax.random.key(seed), _SAMPLING_STREAM), shape)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al. 2014) on uint64: a bijection
    whose outputs pass BigCrush for consecutive inputs."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def grid_noise(seed: int, row: int, col: int, height: int, width: int, channels: int,
               stream: int = 0) -> np.ndarray:
    """(height, width, channels) float32 standard normal noise of the window at
    (row, col) of a scene: each value a hash of (seed, stream, scene row, scene
    column, band), so any window holds the same values at the same scene
    pixels (Box-Muller on two hashed uniforms). Written by hand: numpy's and
    JAX's generators draw arrays, not values at given coordinates."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed * 1_000_003 + stream], np.uint64))
        r = np.arange(row, row + height, dtype=np.uint64)[:, None, None]
        c = np.arange(col, col + width, dtype=np.uint64)[None, :, None]
        b = np.arange(channels, dtype=np.uint64)[None, None, :]
        index = ((r << np.uint64(24)) + c) * np.uint64(64) + b * np.uint64(2)   # bands < 32
        bits = [_splitmix64(_splitmix64(index + np.uint64(j)) ^ key) for j in (0, 1)]
    u1, u2 = [((x >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53 for x in bits]
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def generate(setup: Setup, state: dict, batch: dict, use_ema: bool) -> jax.Array:
    """Images in model space [-1, 1] for the batch's sources: `config.flow.
    sample_steps` steps of `config.flow.solver` from the batch's `noise` (default:
    `sampling_noise(seed)` at the batch's shape), clipped to [-1, 1]. Noise of
    shape (B, H, W, K, C) gives K samples per image and returns their mean and
    standard deviation: (B, H, W, 2 C)."""
    f = setup.config.flow
    sources = {s: batch[s] for s in setup.sources}
    first = sources[setup.sources[0]]
    noise = batch.get("noise")
    if noise is None:
        noise = sampling_noise(int(setup.config.seed),
                               (*first.shape[:3], int(setup.config.out_channels)))
    graph, params, rest = nnx.split(nnx.merge(setup.eval_graph, state["model"]), nnx.Param, ...)
    if use_ema:
        params = state["ema"]

    model = nnx.merge(graph, params, rest)
    # The sources' part of the network once, not at every step (rsjax.models.flow).
    condition = model.condition(sources, first.shape[1:3])

    def velocity(x, t):
        return model.velocity(x, t, condition)

    def one(start):
        out = flow_model.sample(velocity, start.astype(jnp.float32), int(f.sample_steps),
                                str(f.solver))
        return jnp.clip(out, -1.0, 1.0)

    if noise.ndim == 5:   # (B, H, W, K, C): K samples, one after another (memory of one)
        samples = jax.lax.map(one, jnp.moveaxis(noise, 3, 0))
        return jnp.concatenate([samples.mean(axis=0), samples.std(axis=0)], axis=-1)
    return one(noise)
