"""The training benchmark: the real train steps, their FLOP rate and MFU, as JSON.

    rsjax bench steps                                   # the default parts, float32
    rsjax bench steps --parts fusion --sizes 128 --batches 1
    rsjax bench steps --dtype bfloat16                  # on a GPU or TPU
    rsjax bench steps --parts matmul,unet --against torch --rounds 5   # PyTorch's step, same run
    rsjax bench steps --parts uncrtaints,dsen2cr --config_arg demo --profile
    rsjax bench steps --out work/bench.json

Parts: `matmul` (the machine's peak, MFU's denominator), `fusion`, `unet`,
`flow`, `uncrtaints`, `dsen2cr` (each the exact jitted train step `rsjax
train` runs, state donated, on random inputs on the device), `convs` (the
U-Net's 3x3 convolutions one by one), `pipeline` (the input pipeline against
what a step consumes) and `startup` (seconds to the first step, cold and
warm). `--profile` adds where each step's time goes. Every entry records the
machine (CPU model and ISA flags, load); only same-run ratios compare.
docs/benchmarks.md says what each part times and keeps the figures seen.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rsjax import cli, runtime
from rsjax.errors import RunFailed, UserError

PARTS = ("matmul", "fusion", "unet", "flow", "uncrtaints", "dsen2cr", "convs", "pipeline", "startup")
# What `rsjax bench steps` runs without --parts.
DEFAULT_PARTS = ("matmul", "fusion", "unet", "flow", "convs", "pipeline", "startup")
AGAINST = ("none", "torch")

# NVlabs SPADE (PyTorch 2.13, oneDNN, 2 threads) on the development machine,
# 2 cores of an AMD EPYC (Zen 4), float32, batch 1, 15 conditioning channels,
# ngf/ndf 64: seconds per GAN step, measured 2026-11-30 beside rsjax in one
# run (docs/benchmarks.md). Recorded, not measured in the run that
# uses them: the machine's speed drifts between runs, so these ratios are
# rougher than the U-Net's same-run one. The faster end of each range is the
# reference, so a speed-up is never flattered by a slow reference run.
PYTORCH_REFERENCE_DATE = "2026-11-30"
PYTORCH_REFERENCE_PEAK_GFLOPS = 300.0     # that run's float32 matmul peak
PYTORCH_REFERENCE = {
    128: {"seconds_per_step": (2.37, 2.91), "gflop_per_step": 311.0},
    256: {"seconds_per_step": (6.49, 6.49), "gflop_per_step": 1230.0},
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled (or lowered) function, from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per device
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def model_flops(step, *args) -> float | None:
    """FLOPs of one call of the jitted `step` (global batch) as the model defines them.

    XLA's cost analysis of the step traced without the CPU convolution
    rewrites (`cpu_conv.rewrites("off")`) and lowered for CPU, before optimization,
    whatever device runs it: Conv2d's CPU rewrites do the same multiply-adds,
    but partly in a loop whose body the analysis counts once, and on GPU the
    compiled program's convolutions are library calls that its analysis does
    not count (an H200 run reported 4 GFLOP for a 237 GFLOP step). Abstract
    arguments, so nothing is copied, and a fresh `jax.jit`, so the trace is new.
    Where that analysis gives no count (jax 0.11.2 on an H200 did not), the
    convolutions and matrix products of the step's jaxpr (`jaxpr_flops`).
    """
    return model_flops_and_source(step, *args)[0]


def model_flops_and_source(step, *args) -> tuple[float | None, str]:
    """`model_flops` and where the count came from: "xla_cost_analysis" or "jaxpr"."""
    from rsjax.models import cpu_conv
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    with cpu_conv.rewrites("off"):
        fresh = jax.jit(functools.partial(step.__wrapped__))
        traced = fresh.trace(*abstract)
        try:
            flops = compiled_flops(traced.lower(lowering_platforms=("cpu",)))
        except Exception:       # a backend that cannot lower or analyse for CPU
            flops = None
    if flops:
        return flops, "xla_cost_analysis"
    return jaxpr_flops(traced.jaxpr), "jaxpr"


def _conv_flops(eqn) -> float:
    """2 x output elements x (input features per group x kernel window): every
    tap counted, padded or not."""
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec   # (out, in, *spatial)
    window = np.prod([rhs.shape[d] for d in rhs_spec[2:]], dtype=np.float64)
    return 2.0 * np.prod(out.shape, dtype=np.float64) * rhs.shape[rhs_spec[1]] * window


def _dot_flops(eqn) -> float:
    lhs = eqn.invars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    contracted = np.prod([lhs.shape[d] for d in lhs_contract], dtype=np.float64)
    return 2.0 * np.prod(eqn.outvars[0].aval.shape, dtype=np.float64) * contracted


def jaxpr_flops(jaxpr) -> float:
    """FLOPs of the convolutions and matrix products in a (closed) jaxpr, the
    ones nested in calls, custom derivatives and control flow included (a scan
    body times its length, the costliest branch of a cond, a while body once).
    Elementwise work is left out: in these models it is a few per cent of what
    XLA's cost analysis counts. Written by hand because JAX has no
    backend-independent FLOP count of a traced function."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "cond":
            total += max(jaxpr_flops(b) for b in eqn.params["branches"])
        else:
            inner = sum(jaxpr_flops(v) for v in _sub_jaxprs(eqn.params))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def _sub_jaxprs(params) -> list:
    found = []
    for value in params.values():
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns"):
                found.append(v)
    return found


# ---------------------------------------------------------------------------
# Matmul peak
# ---------------------------------------------------------------------------
def matmul_peak(dtype: str, sizes: tuple[int, ...], device=None, repeats: int = 5) -> dict:
    """Best median FLOP/s of square `n x n @ n x n` matmuls on one device."""
    device = device or jax.devices()[0]
    per_size = {}
    for n in sizes:
        rng = np.random.default_rng(n)
        a = jax.device_put(jnp.asarray(rng.standard_normal((n, n)), dtype), device)
        b = jax.device_put(jnp.asarray(rng.standard_normal((n, n)), dtype), device)
        mm = jax.jit(jnp.matmul)
        mm(a, b).block_until_ready()
        median, _ = _median_seconds(lambda: mm(a, b), repeats)
        per_size[str(n)] = round(2 * n**3 / median / 1e9, 1)
    return {"dtype": dtype, "gflop_per_s_by_size": per_size,
            "gflop_per_s": max(per_size.values())}


# ---------------------------------------------------------------------------
# Train steps
# ---------------------------------------------------------------------------
def _load_config(name: str, arg: str | None = None):
    from rsjax.config_loader import load_config
    return load_config(f"{name}:{arg}" if arg else name)


def _step_config(name: str, config_arg: str, size: int, batch: int, dtype: str):
    """The config `name:config_arg` at the bench's tile size, batch and dtype."""
    config = _load_config(name, config_arg or None)
    config.data.tile_size = size
    config.global_batch_size = batch
    config.dtype = dtype
    return config


def fusion_config(size: int, batch: int, dtype: str, config_arg: str = ""):
    config = _step_config("fusion", config_arg, size, batch, dtype)
    config.total_steps = 1000
    return config


def unet_config(size: int, batch: int, dtype: str, config_arg: str = ""):
    return _step_config("segmentation", config_arg, size, batch, dtype)


def random_batch(size: int, batch: int, sources, mesh, *, seed: int = 0) -> dict:
    """A training batch with the pipeline's keys, shapes and value ranges."""
    from rsjax import input_pipeline
    from rsjax import mesh as mesh_lib
    rng = np.random.default_rng(seed)
    shape = (batch, size, size)
    host = {
        "image": rng.uniform(-1, 1, (*shape, 4)).astype(np.float32),
        "label": rng.integers(0, 9, shape).astype(np.int32),
        "valid": np.ones(shape, bool),
    }
    for s in sources:
        c = input_pipeline.SOURCE_CHANNELS[s]
        host[s] = (np.eye(c, dtype=np.float32)[rng.integers(0, c, shape)] if s == "lulc"
                   else rng.standard_normal((*shape, c)).astype(np.float32))
    if "s2_cloudy" in sources:                  # clear, cloud, shadow
        host["cloud_mask"] = rng.integers(0, 3, shape).astype(np.uint8)
    return jax.device_put(host, mesh_lib.batch_sharding(mesh))


def fusion_step(size: int, batch: int, dtype: str, mesh, config_arg: str = ""):
    """(jitted step, state, batch) of the fusion trainer (full configuration
    unless `config_arg` names a variant, e.g. "demo")."""
    from rsjax import mesh as mesh_lib
    from rsjax.trainers import fusion
    config = fusion_config(size, batch, dtype, config_arg)
    sources = fusion.selected_sources(config)
    setup = fusion.make_setup(config, sources)
    state = mesh_lib.init_replicated(setup.init_state, mesh)
    return fusion.step_function(setup), state, random_batch(size, batch, sources, mesh)


def flow_arg(config_arg: str = "") -> str:
    """The fusion config argument of the flow model (on top of `config_arg`)."""
    return ",".join(filter(None, [config_arg, "model=flow"]))


def flow_step(size: int, batch: int, dtype: str, mesh, config_arg: str = ""):
    """(jitted step, state, batch) of the flow model's train step."""
    return fusion_step(size, batch, dtype, mesh, flow_arg(config_arg))


def time_flow_sampling(size: int, batch: int, dtype: str, mesh, config_arg: str,
                       sample_steps: tuple[int, ...], repeats: int,
                       peak_gflops: float | None) -> list[dict]:
    """The flow model's sampler (EMA weights) at each number of steps: one entry each."""
    from flax import nnx

    from rsjax import mesh as mesh_lib
    from rsjax.trainers import flow, fusion
    config = fusion_config(size, batch, dtype, flow_arg(config_arg))
    sources = fusion.selected_sources(config)
    setup = fusion.make_setup(config, sources)
    state = mesh_lib.init_replicated(setup.init_state, mesh)
    data = random_batch(size, batch, sources, mesh)

    @jax.jit
    def condition(state, data):
        model = nnx.merge(setup.eval_graph, state["model"])
        return model.condition({s: data[s] for s in sources}, (size, size))

    @jax.jit
    def velocity(state, data, cond):
        model = nnx.merge(setup.eval_graph, state["model"])
        return model.velocity(data["image"], jnp.full((batch,), 0.5), cond)
    # The sampler computes the sources' part once and the rest at every evaluation.
    per_condition = model_flops(condition, state, data)
    per_evaluation = model_flops(velocity, state, data, jax.eval_shape(condition, state, data))
    evaluations_per_step = 2 if config.flow.solver == "heun" else 1
    entries = []
    for steps in sample_steps:
        config.flow.sample_steps = steps            # read when the sampler is traced
        sampler = jax.jit(functools.partial(flow.generate, setup, use_ema=True))
        t0 = time.perf_counter()
        compiled = sampler.lower(state, data).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(state, data))                 # warm-up
        seconds, fastest = _median_seconds(lambda: compiled(state, data), repeats)
        entry = {"size": size, "batch": batch, "dtype": dtype, "sample_steps": steps,
                 "solver": str(config.flow.solver), "seconds_per_batch": round(seconds, 4),
                 "seconds_min": round(fastest, 4), "images_per_s": round(batch / seconds, 4),
                 "compile_s": round(compile_s, 1)}
        if config_arg:
            entry["config_arg"] = config_arg
        if per_evaluation and per_condition:
            flops = per_condition + per_evaluation * steps * evaluations_per_step
            entry["gflop_condition"] = round(per_condition / 1e9, 3)
            entry["gflop_per_evaluation"] = round(per_evaluation / 1e9, 3)
            entry["gflop_per_batch"] = round(flops / 1e9, 2)
            entry["gflop_per_s"] = round(flops / 1e9 / seconds, 1)
        entries.append(add_ratios(entry, peak_gflops, mesh.devices.size))
    return entries


def cloud_removal_step(model: str, size: int, batch: int, dtype: str, mesh, config_arg: str = ""):
    """(jitted step, state, batch) of the cloud-removal trainer with `model`."""
    from rsjax import mesh as mesh_lib
    from rsjax.trainers import cloud_removal
    config = _step_config("cloud_removal", ",".join(filter(None, [config_arg, f"model={model}"])),
                          size, batch, dtype)
    setup = cloud_removal.Setup(config)
    state = mesh_lib.init_replicated(setup.init_state, mesh)
    step = jax.jit(functools.partial(cloud_removal.train_step, setup), donate_argnums=(0,))
    return step, state, random_batch(size, batch, setup.sources, mesh)


def unet_step(size: int, batch: int, dtype: str, mesh, config_arg: str = ""):
    from rsjax import mesh as mesh_lib
    from rsjax.trainers import segmentation
    config = unet_config(size, batch, dtype, config_arg)
    setup = segmentation.Setup(config)
    state = mesh_lib.init_replicated(setup.init_state, mesh)
    weights = jnp.ones((9,), jnp.float32)
    step = jax.jit(functools.partial(segmentation.train_step, setup, weights),
                   donate_argnums=(0,))
    return step, state, random_batch(size, batch, (), mesh)


class StepTimer:
    """A train step compiled once and warmed up, timed (and traced) on demand,
    its state fed back (donated) as in training."""

    def __init__(self, make: Callable, size: int, batch: int, dtype: str, mesh,
                 config_arg: str = ""):
        self.size, self.batch, self.dtype, self.config_arg = size, batch, dtype, config_arg
        step, state, self.data = make(size, batch, dtype, mesh, config_arg)
        t0 = time.perf_counter()
        self.compiled = step.lower(state, self.data).compile()
        self.compile_s = time.perf_counter() - t0
        self.flops, self.flops_source = model_flops_and_source(step, state, self.data)
        self.state = state
        self.call()                               # warm-up (first-call allocations)

    def call(self):
        self.state, metrics = self.compiled(self.state, self.data)
        return jax.block_until_ready(metrics)

    def time(self, steps: int) -> list[float]:
        """Seconds of each of `steps` calls, each waiting on its metrics."""
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.call()
            times.append(time.perf_counter() - t0)
        return times


def time_train_step(timer: StepTimer, *, steps: int, profile: bool = False) -> dict:
    """The entry of a compiled train step: `steps` calls of it timed (median).
    `profile`: then traces `steps` more calls and adds where they spent their
    time (rsjax.bench_profile) as `profile`."""
    times = timer.time(steps)
    seconds = statistics.median(times)
    out = {"size": timer.size, "batch": timer.batch, "dtype": timer.dtype,
           "seconds_per_step": round(seconds, 4), "seconds_min": round(min(times), 4),
           "images_per_s": round(timer.batch / seconds, 4),
           "compile_s": round(timer.compile_s, 1)}
    if timer.config_arg:
        out["config_arg"] = timer.config_arg
    if timer.flops is not None:
        out["gflop_per_step"] = round(timer.flops / 1e9, 2)
        out["gflop_per_s"] = round(timer.flops / 1e9 / seconds, 1)
        out["flops_source"] = timer.flops_source
    if profile:
        from rsjax.bench import profiling as bench_profile
        out["profile"] = bench_profile.profile_calls(timer.call, timer.compiled.as_text(), steps)
    return out


def add_ratios(entry: dict, peak_gflops: float | None, num_devices: int) -> dict:
    """MFU against the measured peak (of all devices in the mesh)."""
    if peak_gflops and "gflop_per_s" in entry:
        entry["mfu"] = round(entry["gflop_per_s"] / (peak_gflops * num_devices), 3)
    return entry


def add_reference(entry: dict, peak_gflops: float | None = None) -> dict:
    """The recorded PyTorch reference's images/s and rsjax's over it; with this
    run's matmul peak, also that ratio with both sides scaled to the same peak
    (`speedup_vs_pytorch_at_equal_peak`): an estimate for a machine whose speed
    drifts between runs (on a loaded machine the raw ratio says more about the
    load than about the code), still not a same-run figure."""
    ref = PYTORCH_REFERENCE.get(entry["size"])
    # The reference is the full-width model: a variant is not comparable.
    if ref and entry["batch"] == 1 and entry["dtype"] == "float32" and not entry.get("config_arg"):
        ref_images_per_s = 1.0 / ref["seconds_per_step"][0]
        entry["pytorch_reference"] = "recorded, not same-run"
        entry["pytorch_reference_date"] = PYTORCH_REFERENCE_DATE
        entry["pytorch_reference_images_per_s"] = round(ref_images_per_s, 4)
        entry["speedup_vs_pytorch"] = round(entry["images_per_s"] / ref_images_per_s, 2)
        entry["pytorch_reference_gflop_per_step"] = ref["gflop_per_step"]
        if peak_gflops:
            entry["pytorch_reference_matmul_peak_gflop_per_s"] = PYTORCH_REFERENCE_PEAK_GFLOPS
            entry["speedup_vs_pytorch_at_equal_peak"] = round(
                entry["speedup_vs_pytorch"] * PYTORCH_REFERENCE_PEAK_GFLOPS / peak_gflops, 2)
    return entry


def _run_bench_torch(what: str, size: int, batch: int, dtype: str, steps: int,
                     config_arg: str, *flags: str) -> dict:
    """`python -m rsjax.bench.pytorch` for the U-Net the segmentation config
    builds, in a subprocess (its own thread pool, none of XLA's); its JSON."""
    model = unet_config(size, batch, dtype, config_arg).model
    cmd = [sys.executable, "-m", "rsjax.bench.pytorch", *flags, "--batch", str(batch),
           "--size", str(size), "--steps", str(steps), "--dtype", dtype,
           "--width", str(model.width), "--depth", str(model.depth)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RunFailed(f"{what} ({' '.join(cmd[1:])}) failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def torch_unet_step(size: int, batch: int, dtype: str, steps: int, config_arg: str = "") -> dict:
    """PyTorch's train step of the U-Net the segmentation config builds (`rsjax.bench_torch`)."""
    return _run_bench_torch("the PyTorch U-Net step", size, batch, dtype, steps, config_arg)


def conv_layer_step(layer: dict, batch: int, dtype: str):
    """(jitted f, args, path) where f computes one U-Net conv layer's forward
    pass and the gradients the train step needs of it, the way `layers.Conv2d`
    computes them in the step (its CPU rewrites included)."""
    from flax import nnx
    from rsjax.models import cpu_conv, layers
    conv = layers.Conv2d(layer["in"], layer["out"], 3, use_bias=False,
                         kernel_init=layers.he_init, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(conv)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    rng = np.random.default_rng(0)
    shape = (batch, layer["resolution"], layer["resolution"])
    x = jnp.asarray(rng.standard_normal((*shape, layer["in"])), dtype)
    dy = jnp.asarray(rng.standard_normal((*shape, layer["out"])), dtype)
    path = cpu_conv.rewrite_for(conv.kernel.shape, 1, conv.padding, x) or "xla"

    def forward(params, x):
        return nnx.merge(graphdef, params)(x)

    if layer["input_grad"]:
        def grads(params, x, dy):
            _, vjp = jax.vjp(forward, params, x)
            return vjp(dy)
    else:
        def grads(params, x, dy):
            _, vjp = jax.vjp(lambda p: forward(p, x), params)
            return vjp(dy)
    return jax.jit(grads), (params, x, dy), path


def time_conv_layers(size: int, batch: int, dtype: str, steps: int,
                     config_arg: str = "") -> dict:
    """Each distinct 3x3 convolution of the U-Net step at `size` x `batch`
    (`bench_torch.unet_conv_layers`), forward + gradients, timed alone."""
    from rsjax.bench import pytorch as bench_torch
    model = unet_config(size, batch, dtype, config_arg).model
    out = []
    for layer in bench_torch.unet_conv_layers(size, width=int(model.width),
                                              depth=int(model.depth)):
        fn, args, path = conv_layer_step(layer, batch, dtype)
        jax.block_until_ready(fn(*args))                 # compile and warm up
        seconds, fastest = _median_seconds(lambda: fn(*args), steps)
        gflop = bench_torch.conv_layer_gflop(layer, batch)
        out.append({**{k: layer[k] for k in ("in", "out", "resolution", "input_grad", "count",
                                             "names")},
                    "path": path, "gflop": round(gflop, 6), "seconds": round(seconds, 6),
                    "seconds_min": round(fastest, 6), "gflop_per_s": round(gflop / seconds, 1)})
    return {"size": size, "batch": batch, "dtype": dtype, "layers": out,
            "total": conv_totals(out)}


def conv_totals(layers: list[dict], seconds_key: str = "seconds") -> dict:
    """Seconds and GFLOP/s of all the step's 3x3 convolutions (each layer
    `count` times)."""
    seconds = sum(l["count"] * l[seconds_key] for l in layers)
    gflop = sum(l["count"] * l["gflop"] for l in layers)
    return {"seconds": round(seconds, 4), "gflop": round(gflop, 2),
            "gflop_per_s": round(gflop / seconds, 1)}


def torch_conv_layers(size: int, batch: int, dtype: str, steps: int,
                      config_arg: str = "") -> dict:
    """PyTorch's times of the same layers (`python -m rsjax.bench.pytorch --convs`)."""
    return _run_bench_torch("the PyTorch convolutions", size, batch, dtype, steps, config_arg,
                            "--convs")


def add_torch_convs(entry: dict, torch_entry: dict, peak_gflops: float | None = None) -> dict:
    """PyTorch's seconds beside each layer's and rsjax's speed over PyTorch's
    (`speedup_vs_pytorch`: PyTorch's seconds / rsjax's), per layer and in total.
    Layers are matched by (in, out, resolution, input_grad); a missing one is an error."""
    theirs = {(l["in"], l["out"], l["resolution"], l["input_grad"]): l
              for l in torch_entry["layers"]}
    for layer in entry["layers"]:
        key = (layer["in"], layer["out"], layer["resolution"], layer["input_grad"])
        if key not in theirs:
            raise RunFailed(f"PyTorch timed no {key[0]} -> {key[1]} convolution at "
                            f"{key[2]} px: not the same layers, no comparison.")
        layer["pytorch_seconds"] = round(theirs[key]["seconds"], 6)
        layer["speedup_vs_pytorch"] = round(theirs[key]["seconds"] / layer["seconds"], 3)
    total = conv_totals(entry["layers"], "pytorch_seconds")
    entry["pytorch"] = {"torch_version": torch_entry["torch_version"],
                        "threads": torch_entry["threads"], "total": total}
    entry["total"]["speedup_vs_pytorch"] = round(total["seconds"] / entry["total"]["seconds"], 3)
    add_ratios(total, peak_gflops, 1)
    return entry


def add_rounds(entry: dict, rounds: list[tuple[float, float]]) -> dict:
    """`speedup_vs_pytorch_rounds`: rsjax's speed over PyTorch's in each round
    of (rsjax seconds per step, PyTorch seconds per step) timed one after the
    other, and their median, min and max: how much the ratio moves with the
    machine within one run (the entry's other figures are the first round's)."""
    ratios = [round(theirs / ours, 3) for ours, theirs in rounds]
    entry["speedup_vs_pytorch_rounds"] = {
        "rsjax_seconds": [round(ours, 4) for ours, _ in rounds],
        "pytorch_seconds": [round(theirs, 4) for _, theirs in rounds],
        "speedup": ratios, "median": round(statistics.median(ratios), 3),
        "min": min(ratios), "max": max(ratios)}
    return entry


def unet_parameters(config_arg: str = "") -> int:
    """Trainable parameters of the U-Net the segmentation config builds."""
    from rsjax.models.param_table import abstract_model, count_params
    model = unet_config(0, 1, "float32", config_arg).model
    return count_params(abstract_model("rs_unet", in_channels=4, num_classes=9,
                                       width=int(model.width), depth=int(model.depth)))


def add_torch_comparison(entry: dict, torch_entry: dict, parameters: int,
                         peak_gflops: float | None = None) -> dict:
    """PyTorch's figures of the same step in this run, its FLOP rate and MFU at
    rsjax's FLOP count (the same model) and rsjax's images/s over PyTorch's.
    A PyTorch model with another parameter count is not the same model: an error."""
    if torch_entry["parameters"] != parameters:
        raise RunFailed(f"the PyTorch U-Net has {torch_entry['parameters']:,} parameters, "
                        f"rsjax's {parameters:,}: not the same layout, no comparison.")
    entry["parameters"] = parameters
    torch_fields = {k: torch_entry[k] for k in (
        "torch_version", "threads", "parameters", "seconds_per_step", "seconds_min",
        "images_per_second")}
    if "gflop_per_step" in entry:
        torch_fields["gflop_per_s"] = round(
            entry["gflop_per_step"] / torch_entry["seconds_per_step"], 1)
        if peak_gflops:
            torch_fields["mfu"] = round(torch_fields["gflop_per_s"] / peak_gflops, 3)
    entry["pytorch"] = torch_fields
    entry["speedup_vs_pytorch"] = round(entry["images_per_s"] / torch_entry["images_per_second"], 3)
    return entry


# ---------------------------------------------------------------------------
# Input pipeline
# ---------------------------------------------------------------------------
def pipeline_rate(data_dir: str, batch: int, batches: int) -> dict:
    """Host-side tiles/s (and megapixels/s) of the fusion training pipeline on
    the demo dataset, built first if missing."""
    from rsjax import input_pipeline
    from rsjax.bench import pipeline as bench_pipeline
    config = _load_config("fusion", "demo")
    if data_dir:
        config.data.data_dir = data_dir
    input_pipeline.ensure_dataset(config.data)
    rate = bench_pipeline.time_pipeline(config.data, batch_size=batch, batches=batches,
                                        worker_count=0)
    tile = int(config.data.tile_size)
    return {"dataset": config.data.name, "tile_size": tile, "batch": batch, "workers": 0,
            "tiles_per_s": rate["tiles_per_s"],
            "megapixels_per_s": round(rate["tiles_per_s"] * tile * tile / 1e6, 3)}


def pipeline_headroom(pipe: dict, fusion_results: list[dict]) -> list[dict]:
    """How many times faster the pipeline delivers pixels than each step eats them."""
    out = []
    for r in fusion_results:
        need = r["images_per_s"] * r["size"] ** 2 / 1e6
        out.append({"size": r["size"], "batch": r["batch"],
                    "step_megapixels_per_s": round(need, 3),
                    "pipeline_over_step": round(pipe["megapixels_per_s"] / need, 1)})
    return out


def machine() -> dict:
    dev = jax.devices()[0]
    return {**runtime.host(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "platform": dev.platform, "device_kind": dev.device_kind,
            "num_devices": jax.device_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            # Other work on the machine slows both frameworks: the load says how much.
            "loadavg_1_5_15_min": [round(x, 2) for x in os.getloadavg()]}


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--parts", type=cli.name_list(PARTS), default=",".join(DEFAULT_PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (default "
                             f"{','.join(DEFAULT_PARTS)})")
    parser.add_argument("--sizes", type=cli.int_list, default="128,256",
                        help="tile sizes, comma-separated")
    parser.add_argument("--batches", type=cli.int_list, default="1,4",
                        help="global batch sizes, comma-separated")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of the steps and the matmul peak")
    parser.add_argument("--devices", type=cli.positive_int, default=1,
                        help="devices in the mesh (data parallel)")
    parser.add_argument("--steps", type=cli.positive_int, default=3,
                        help="timed steps per entry (median)")
    parser.add_argument("--matmul_sizes", type=cli.int_list, default=None,
                        help="square matmul sizes for the peak (default 2048,4096; 8192 on GPU/TPU)")
    parser.add_argument("--data_dir", default=None,
                        help="where the demo dataset is (built if missing) for the pipeline part "
                             "(default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    parser.add_argument("--config_arg", default="",
                        help="config variant for both steps, e.g. 'demo' (default: the full model)")
    parser.add_argument("--against", choices=AGAINST, default="none",
                        help="torch: also time PyTorch's step of the same U-Net in this run "
                             "(needs the bench extra) and report the ratio")
    parser.add_argument("--rounds", type=cli.positive_int, default=1,
                        help="with --against torch: time rsjax's and PyTorch's U-Net step "
                             "this many times, one after the other, and report the ratio of "
                             "each round with its median, min and max")
    parser.add_argument("--profile", action="store_true",
                        help="also trace --steps more calls of each train step and report "
                             "where they spent their time, by operation class "
                             "(rsjax.bench_profile)")
    parser.add_argument("--flow_sample_steps", type=cli.int_list, default="1,2,4,8",
                        help="the flow part: sampling steps to time, comma-separated")
    parser.add_argument("--out", default=None, help="also write the JSON report here")


def check_args(args) -> None:
    if args.devices > jax.device_count():
        raise UserError(f"--devices={args.devices}: this machine has {jax.device_count()} devices")
    for b in args.batches:
        if b % args.devices:
            raise UserError(f"--batches: {b} is not divisible by --devices={args.devices}")
    if args.config_arg:
        _load_config("fusion", args.config_arg)        # an unknown variant fails here, first
    if args.rounds > 1 and args.against != "torch":
        raise UserError("--rounds repeats the comparison with PyTorch: add --against torch.")
    if args.against == "torch":
        check_torch_args(args)
    elif "convs" in args.parts:
        check_unet_sizes(args)


def check_unet_sizes(args) -> None:
    depth = int(unet_config(0, 1, args.dtype, args.config_arg).model.depth)
    for size in args.sizes:
        if size % 2**depth:
            raise UserError(f"--sizes: {size} is not a multiple of {2**depth}, which the "
                            f"{depth}-level U-Net needs.")


def check_torch_args(args) -> None:
    """The flags first (they fail the same with or without PyTorch), then PyTorch."""
    if "unet" not in args.parts and "convs" not in args.parts:
        raise UserError("--against torch compares the U-Net step or its convolutions: "
                        "add unet or convs to --parts.")
    if args.devices != 1:
        raise UserError(f"--against torch times PyTorch on one process: use --devices 1, "
                        f"not {args.devices}.")
    check_unet_sizes(args)
    if importlib.util.find_spec("torch") is None:
        raise UserError("--against torch needs PyTorch: pip install 'rsjax[bench]' (on machines "
                        "without a GPU take PyTorch's CPU build first: pip install torch "
                        "--index-url https://download.pytorch.org/whl/cpu).")


def benchmark(args) -> dict:
    """The JSON report (see the module docstring)."""
    from rsjax import mesh as mesh_lib
    mesh = mesh_lib.create_mesh(jax.devices()[:args.devices])
    report: dict[str, Any] = {"machine": machine(), "config": {
        k: v for k, v in vars(args).items() if k not in ("out", "verbose", "config_overrides")}}
    on_cpu = jax.devices()[0].platform == "cpu"
    peak = None
    if "matmul" in args.parts:
        sizes = args.matmul_sizes or ((2048, 4096) if on_cpu else (4096, 8192))
        _log(f"matmul peak ({args.dtype}, sizes {sizes}) ...")
        report["matmul_peak"] = matmul_peak(args.dtype, tuple(sizes))
        peak = report["matmul_peak"]["gflop_per_s"]
        _log(f"  {peak} GFLOP/s")

    steps = (("fusion", fusion_step), ("unet", unet_step), ("flow", flow_step),
             ("uncrtaints", functools.partial(cloud_removal_step, "uncrtaints")),
             ("dsen2cr", functools.partial(cloud_removal_step, "dsen2cr")))
    for part, make in steps:
        if part not in args.parts:
            continue
        results = report.setdefault(part, [])
        for size in args.sizes:
            for batch in args.batches:
                _log(f"{part} train step {batch}x{size}x{size} ({args.dtype}) ...")
                timer = StepTimer(make, size, batch, args.dtype, mesh, args.config_arg)
                entry = time_train_step(timer, steps=args.steps, profile=args.profile)
                add_ratios(entry, peak, args.devices)
                if part == "fusion":
                    add_reference(entry, peak)
                elif part == "flow":
                    timer = None                             # the step's state, before the sampler's
                    _log(f"  sampling at {list(args.flow_sample_steps)} steps ...")
                    entry = {"train_step": entry, "sampling": time_flow_sampling(
                        size, batch, args.dtype, mesh, args.config_arg,
                        tuple(args.flow_sample_steps), args.steps, peak)}
                elif args.against == "torch":
                    _log(f"  PyTorch U-Net step {batch}x{size}x{size} ...")
                    theirs = torch_unet_step(size, batch, args.dtype, args.steps, args.config_arg)
                    add_torch_comparison(entry, theirs, unet_parameters(args.config_arg), peak)
                    rounds = [(entry["seconds_per_step"], theirs["seconds_per_step"])]
                    for r in range(2, args.rounds + 1):
                        _log(f"  round {r} of {args.rounds}: rsjax, then PyTorch ...")
                        ours = statistics.median(timer.time(args.steps))
                        rounds.append((ours, torch_unet_step(
                            size, batch, args.dtype, args.steps,
                            args.config_arg)["seconds_per_step"]))
                    if args.rounds > 1:
                        add_rounds(entry, rounds)
                del timer                                    # its state and buffers
                _log("  " + json.dumps(entry))
                results.append(entry)

    if "convs" in args.parts:
        for size in args.sizes:
            for batch in args.batches:
                _log(f"U-Net 3x3 convolutions one by one, {batch}x{size}x{size} ...")
                entry = time_conv_layers(size, batch, args.dtype, args.steps, args.config_arg)
                add_ratios(entry["total"], peak, 1)          # one device's convolutions
                if args.against == "torch":
                    _log("  PyTorch's ...")
                    add_torch_convs(entry, torch_conv_layers(
                        size, batch, args.dtype, args.steps, args.config_arg), peak)
                _log("  " + json.dumps(entry["total"]))
                report.setdefault("convs", []).append(entry)

    if "pipeline" in args.parts:
        _log("input pipeline (demo dataset, host batches) ...")
        pipe = pipeline_rate(args.data_dir, batch=8, batches=40)
        if report.get("fusion"):
            pipe["against_fusion_step"] = pipeline_headroom(pipe, report["fusion"])
        report["pipeline"] = pipe
    if "startup" in args.parts:
        from rsjax.bench import startup as bench_startup
        _log("seconds to the first step: the quick start's train command, 1 step, "
             "cold then warm compilation cache (a few minutes) ...")
        report["startup"] = bench_startup.startup(args.data_dir)
        _log("  " + json.dumps(report["startup"]))
    report["loadavg_1_5_15_min_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def run(args) -> int:
    check_args(args)
    report = benchmark(args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
