"""A/B: XLA's conv vs cpu_conv forms, forward + both gradients, interleaved."""
import sys, time, statistics, json
import jax, jax.numpy as jnp, numpy as np
from rsjax import bench
from rsjax.models import cpu_conv

def make(cin, cout, res, b, k, mode):
    layer = {"in": cin, "out": cout, "resolution": res, "input_grad": True, "count": 1, "names": []}
    old_min = cpu_conv._ROW_KERNEL_GRAD_MIN_OUTPUTS
    old_use = cpu_conv.use_matmul
    if mode == "row":
        cpu_conv._ROW_KERNEL_GRAD_MIN_OUTPUTS = 1
    if mode == "matmul":
        cpu_conv.use_matmul = lambda *a: True
    ctx = cpu_conv.rewrites("off" if mode == "xla" else "auto")
    with ctx:
        from flax import nnx
        from rsjax.models import layers
        conv = layers.Conv2d(cin, cout, k, use_bias=False, rngs=nnx.Rngs(0))
        g, p = nnx.split(conv)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((b, res, res, cin)), jnp.float32)
        dy = jnp.asarray(np.random.default_rng(1).standard_normal((b, res, res, cout)), jnp.float32)
        def f(p, x, dy):
            _, vjp = jax.vjp(lambda p, x: nnx.merge(g, p)(x), p, x)
            return vjp(dy)
        fn = jax.jit(f)
        jax.block_until_ready(fn(p, x, dy))
    cpu_conv._ROW_KERNEL_GRAD_MIN_OUTPUTS = old_min
    cpu_conv.use_matmul = old_use
    return lambda: jax.block_until_ready(fn(p, x, dy))

cases = json.loads(sys.argv[1])
for cin, cout, res, b, k, modes in cases:
    fns = {m: make(cin, cout, res, b, k, m) for m in modes}
    t = {m: [] for m in modes}
    for _ in range(3):
        for m in modes:
            t0 = time.perf_counter(); fns[m](); t[m].append(time.perf_counter() - t0)
    best = {m: round(min(v), 4) for m, v in t.items()}
    print(f"{k}x{k} {cin}->{cout} at {b}x{res}: {best}", flush=True)
