"""Where one rsjax train step spends its time on a GPU: a jax.profiler trace of a
few steps, device time summed per kernel and per class (matmul/conv, fused
elementwise, reductions, copies), and the share of the step's wall time the GPU
was busy. usage: profile_step.py fusion|unet BATCH SIZE DTYPE [config_arg] OUT.json"""
import collections, glob, json, os, shutil, sys, time

import jax
from jax.profiler import ProfileData

from rsjax import bench, mesh as mesh_lib

part, batch, size, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config_arg = sys.argv[5] if len(sys.argv) > 6 else ""
out_path = sys.argv[-1]
mesh = mesh_lib.create_mesh(jax.devices()[:1])
make = bench.unet_step if part == "unet" else bench.fusion_step
step, state, data = make(size, batch, dtype, mesh, config_arg)
t0 = time.perf_counter()
compiled = step.lower(state, data).compile()
compile_s = time.perf_counter() - t0
for _ in range(3):
    state, m = compiled(state, data)
jax.block_until_ready(m)
n = 5
trace_dir = f"/tmp/trace_{part}_{batch}x{size}_{dtype}"
shutil.rmtree(trace_dir, ignore_errors=True)
jax.profiler.start_trace(trace_dir)
t0 = time.perf_counter()
for _ in range(n):
    state, m = compiled(state, data)
jax.block_until_ready(m)
wall = (time.perf_counter() - t0) / n
jax.profiler.stop_trace()

pd = ProfileData.from_file(sorted(glob.glob(trace_dir + "/**/*.xplane.pb", recursive=True))[-1])
planes = {}
kernel_ms = collections.Counter()
kernel_n = collections.Counter()
op_ms = collections.Counter()
for plane in pd.planes:
    planes[plane.name] = [line.name for line in plane.lines]
    if "GPU" not in plane.name:
        continue
    for line in plane.lines:
        lname = line.name
        for e in line.events:
            if lname == "XLA Ops":
                op_ms[e.name] += e.duration_ns / 1e6 / n
            elif lname.startswith("Stream") and "MemcpyH2D" not in lname:
                kernel_ms[e.name] += e.duration_ns / 1e6 / n
                kernel_n[e.name] += 1


def kind(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("gemm", "xmma", "cutlass", "sm90", "conv", "cudnn", "wgmma", "hmma", "implicit")):
        return "matmul/conv"
    if "reduce" in low or "reduction" in low:
        return "reduction"
    if "memcpy" in low or "memset" in low or "copy" in low or "transpose" in low:
        return "copy/transpose"
    if "fusion" in low or "loop" in low or "input_" in low:
        return "fused elementwise"
    return "other"


by_kind = collections.Counter()
for k, v in kernel_ms.items():
    by_kind[kind(k)] += v
busy = sum(kernel_ms.values())
report = {
    "part": part, "batch": batch, "size": size, "dtype": dtype, "config_arg": config_arg,
    "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
    "compile_s": round(compile_s, 2), "step_wall_ms": round(wall * 1e3, 2),
    "gpu_kernel_ms_per_step": round(busy, 2),
    "gpu_busy_fraction": round(busy / (wall * 1e3), 3) if wall else None,
    "kernels_per_step": round(sum(kernel_n.values()) / n, 1),
    "ms_per_step_by_kind": {k: round(v, 2) for k, v in by_kind.most_common()},
    "top_kernels_ms": [[k[:160], round(v, 3), kernel_n[k] // n] for k, v in kernel_ms.most_common(25)],
    "top_xla_ops_ms": [[k[:120], round(v, 3)] for k, v in op_ms.most_common(25)],
    "planes": {k: v[:12] for k, v in planes.items()},
}
json.dump(report, open(out_path, "w"), indent=1)
print(json.dumps({k: report[k] for k in ("part", "batch", "dtype", "step_wall_ms", "gpu_kernel_ms_per_step",
                                         "gpu_busy_fraction", "kernels_per_step", "ms_per_step_by_kind")}))
