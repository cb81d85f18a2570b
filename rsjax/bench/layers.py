"""Forward+backward throughput of the rsjax models, with XLA's FLOP counts. JSON out.

    rsjax bench layers                      # G, D, U-Net at 128 and 256, batch 1 and 4
    rsjax bench layers --sizes 128 --batches 1,4 --models G,D,unet
    rsjax bench layers --models gan --sizes 128 --batches 1   # one G+D GAN step

Run it with XLA_FLAGS unset (one device): it measures a single device. The
models are at the paper's reference configuration (RS-SPADE generator, SPADE's
multi-scale discriminator, RS-UNet); a step is the loss's forward pass and the
gradient of every parameter, jitted, in training mode; `gan` is one step of
both networks as a trainer runs it. FLOPs per step come from
`jax.jit(f).lower(...).compile().cost_analysis()`.
docs/benchmarks.md (section "Single models: `rsjax bench layers`") says more.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsjax import cli, runtime
from rsjax.models import create_model
from rsjax.models.patchgan import conditional_input

SOURCES = {"lulc": 9, "s1": 2, "dem": 4}
OUT_BANDS = 4
MODEL_NAMES = ("G", "D", "unet", "gan")


def build(name: str, args) -> nnx.Module:
    """Builds a model once; all sizes and batches reuse it (the models are fully
    convolutional; the generator's output size is passed per call)."""
    rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))  # fast to compile, see tests
    if name == "G":
        kwargs = dict(source_channels=SOURCES, out_channels=OUT_BANDS, ngf=args.ngf,
                      embed_dim=args.embed_dim, embedding=args.embedding)
        return create_model("rs_spade", **kwargs, rngs=rngs)
    if name == "D":
        return create_model("multiscale_patchgan", in_channels=sum(SOURCES.values()) + OUT_BANDS,
                            ndf=args.ndf, rngs=rngs)
    if name == "unet":
        return create_model("rs_unet", in_channels=OUT_BANDS, num_classes=9,
                            width=args.unet_width, rngs=rngs)
    raise ValueError(name)


def random_batch(batch: int, size: int, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    lulc = np.eye(9, dtype=np.float32)[rng.integers(0, 9, (batch, size, size))]
    return {
        "sources": {"lulc": jnp.asarray(lulc),
                    "s1": jnp.asarray(rng.normal(size=(batch, size, size, 2)), jnp.float32),
                    "dem": jnp.asarray(rng.normal(size=(batch, size, size, 4)), jnp.float32)},
        "image": jnp.asarray(rng.uniform(-1, 1, (batch, size, size, OUT_BANDS)), jnp.float32),
        "labels": jnp.asarray(rng.integers(0, 9, (batch, size, size))),
    }


def single_model_step(model: nnx.Module, loss_of_output: Callable, apply: Callable):
    """(step, state): step(state, batch) -> (grads, new non-param state, loss);
    `apply(model, batch)` runs the model, `loss_of_output(output, batch)` scores it."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def step(state, batch):
        params, rest = state

        def loss_fn(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            loss = loss_of_output(apply(m, batch), batch)
            return loss, nnx.state(m, nnx.Not(nnx.Param))
        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, new_rest, loss
    return step, (params, rest)


def gan_step(generator: nnx.Module, discriminator: nnx.Module):
    g_def, g_params, g_rest = nnx.split(generator, nnx.Param, ...)
    d_def, d_params, d_rest = nnx.split(discriminator, nnx.Param, ...)

    def step(state, batch):
        g_params, g_rest, d_params, d_rest = state
        sources, real = batch["sources"], batch["image"]

        def losses(g_params, d_params):
            g = nnx.merge(g_def, g_params, g_rest, copy=True)
            d = nnx.merge(d_def, d_params, d_rest, copy=True)
            fake = g(sources, out_size=real.shape[1:3])
            # One D pass on [real; fake] (as SPADE does); G's loss sees D through
            # stop_gradient on D's parameters, D's loss sees a stopped fake.
            d_frozen = nnx.merge(d_def, jax.lax.stop_gradient(d_params), d_rest, copy=True)
            both = d(jnp.concatenate([conditional_input(sources, real),
                                      conditional_input(sources, jax.lax.stop_gradient(fake))]))
            for_g = d_frozen(conditional_input(sources, fake))
            n = real.shape[0]
            d_loss = sum(jnp.mean(jax.nn.relu(1 - s[-1][:n])) + jnp.mean(jax.nn.relu(1 + s[-1][n:]))
                         for s in both)
            g_loss = sum(-jnp.mean(s[-1]) for s in for_g)
            g_loss += 10 * sum(jnp.mean(jnp.abs(f - jax.lax.stop_gradient(r[:n])))
                               for rs, fs in zip(both, for_g)
                               for r, f in zip(rs[:-1], fs[:-1])) / len(both)
            rest = (nnx.state(g, nnx.Not(nnx.Param)), nnx.state(d, nnx.Not(nnx.Param)))
            return g_loss + d_loss, rest
        (loss, rest), grads = jax.value_and_grad(losses, argnums=(0, 1), has_aux=True)(
            g_params, d_params)
        return grads, rest, loss
    return step, (g_params, g_rest, d_params, d_rest)


def make_step(name: str, models: dict[str, nnx.Module]):
    if name == "G":
        return single_model_step(
            models["G"], lambda y, b: jnp.mean(jnp.abs(y - b["image"])),
            lambda m, b: m(b["sources"], out_size=b["image"].shape[1:3]))
    if name == "D":
        return single_model_step(
            models["D"], lambda outs, b: sum(jnp.mean(jax.nn.relu(1 - s[-1])) for s in outs),
            lambda m, b: m(conditional_input(b["sources"], b["image"])))
    if name == "unet":
        def cross_entropy(logits, b):
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, b["labels"][..., None], axis=-1))
        return single_model_step(models["unet"], cross_entropy, lambda m, b: m(b["image"]))
    if name == "gan":
        return gan_step(models["G"], models["D"])
    raise ValueError(name)


def flops_of(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def measure(step, state, batch, *, steps: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(state, batch))  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    flops = flops_of(compiled)
    return {"seconds_per_step": round(seconds, 4),
            "seconds_min": round(min(times), 4),
            "gflop_per_step": None if flops is None else float(f"{flops / 1e9:.5g}"),
            "gflop_per_s": None if flops is None else round(flops / 1e9 / seconds, 1),
            "compile_s": round(compile_s, 1)}


def add_arguments(parser) -> None:
    parser.add_argument("--models", type=cli.name_list(MODEL_NAMES), default="G,D,unet",
                        help=f"comma-separated subset of {','.join(MODEL_NAMES)}")
    parser.add_argument("--sizes", type=cli.int_list, default="128,256",
                        help="tile sizes, comma-separated")
    parser.add_argument("--batches", type=cli.int_list, default="1,4",
                        help="batch sizes, comma-separated")
    parser.add_argument("--ngf", type=cli.positive_int, default=64, help="generator width")
    parser.add_argument("--ndf", type=cli.positive_int, default=64, help="discriminator width")
    parser.add_argument("--unet_width", type=cli.positive_int, default=64, help="RS-UNet width")
    parser.add_argument("--embed_dim", type=cli.positive_int, default=32,
                        help="RS-SPADE's per-source embedding width")
    parser.add_argument("--embedding", choices=("per_source", "none"), default="per_source",
                        help="RS-SPADE's source embedding (none: SPADE's concatenated inputs)")
    parser.add_argument("--steps", type=cli.positive_int, default=3,
                        help="timed steps (median reported)")


def benchmark(args) -> dict[str, Any]:
    """The JSON report: one entry per model, size and batch."""
    names = args.models
    needed = {"gan": ("G", "D")}
    models = {}
    for name in names:
        for part in needed.get(name, (name,)):
            if part not in models:
                models[part] = build(part, args)
    results = []
    for name in names:
        step, state = make_step(name, models)
        for size in args.sizes:
            for batch_size in args.batches:
                entry = {"model": name, "size": size, "batch": batch_size}
                entry.update(measure(step, state, random_batch(batch_size, size),
                                     steps=args.steps))
                entry["images_per_s"] = round(batch_size / entry["seconds_per_step"], 3)
                results.append(entry)
                print(json.dumps(entry), file=sys.stderr, flush=True)      # progress
    return {
        "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
        "platform": runtime.cpu_name(), "jax": jax.__version__,
        "config": {k: v for k, v in vars(args).items() if k not in ("verbose", "config_overrides")},
        "results": results,
    }


def run(args) -> int:
    cli.print_json(benchmark(args))
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
