"""Interleaved A/B of a train step: the CPU conv rules before (1x1 only as
matmul for big kernels, row kernel grad from 64 outputs) and after this change."""
import sys, time, statistics, json
import jax
from rsjax import bench, mesh as mesh_lib
from rsjax.models import cpu_conv

part, size, batch, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
make = bench.fusion_step if part == "fusion" else bench.unet_step
mesh = mesh_lib.create_mesh(jax.devices()[:1])
new_use, new_min = cpu_conv.use_matmul, cpu_conv._ROW_KERNEL_GRAD_MIN_OUTPUTS

def old_use(kernel_shape, stride, padding, x):
    kh, kw, _, out = kernel_shape
    b, h, w = x.shape[0], x.shape[1], x.shape[2]
    (lo_h, hi_h), (lo_w, hi_w) = padding
    px = b * ((h + lo_h + hi_h - kh) // stride + 1) * ((w + lo_w + hi_w - kw) // stride + 1)
    return kh * kw * out >= 4 * px

runs = {}
for name, use, mn in (("before", old_use, 64), ("after", new_use, new_min)):
    cpu_conv.use_matmul, cpu_conv._ROW_KERNEL_GRAD_MIN_OUTPUTS = use, mn
    step, state, data = make(size, batch, "float32", mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    print(name, "compile", round(time.perf_counter() - t0, 1), flush=True)
    state, m = compiled(state, data); jax.block_until_ready(m)
    runs[name] = [compiled, state, data, []]
cpu_conv.use_matmul, cpu_conv._ROW_KERNEL_GRAD_MIN_OUTPUTS = new_use, new_min
for _ in range(reps):
    for name, r in runs.items():
        t0 = time.perf_counter()
        r[1], m = r[0](r[1], r[2]); jax.block_until_ready(m)
        r[3].append(time.perf_counter() - t0)
out = {n: {"median": round(statistics.median(r[3]), 3), "min": round(min(r[3]), 3)} for n, r in runs.items()}
out["speedup"] = round(out["before"]["median"] / out["after"]["median"], 3)
print(json.dumps({"part": part, "size": size, "batch": batch, **out}), flush=True)
