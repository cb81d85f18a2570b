"""rsjax.models under data parallelism: jit over a Mesh of 8 fake CPU devices
(tests/conftest.py sets them) with the batch sharded on a 'data' axis.

Every step waits on its results (block_until_ready): a loop that runs ahead
of 8 fake devices on 2 cores can abort in an XLA all-reduce rendezvous.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rsjax.models.patchgan import MultiscaleDiscriminator, conditional_input
from rsjax.models.spade import RSSpadeGenerator, SPADEResBlock

SOURCES = {"lulc": 9, "s1": 2, "dem": 5}


def rngs(seed=0):
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))  # fast to compile, see test_models.py


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip(f"needs 8 devices, this process has {jax.device_count()}: "
                    f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r} sets another device count")
    return jax.make_mesh((8,), ("data",))


def forward_with_stats(graphdef, state, x, modulation):
    """A pure training-mode forward: output and the updated BatchStat state."""
    block = nnx.merge(graphdef, state)
    y = block(x, modulation)
    return y, nnx.state(block, nnx.BatchStat)


def test_batchnorm_statistics_are_global_on_8_devices(mesh):
    block = SPADEResBlock(8, 4, 3, rngs=rngs())  # BatchNorm in 3 SPADEs, spectral norm in 3 convs
    graphdef, state = nnx.split(block)
    rng = np.random.default_rng(0)
    # Per-example offsets make every device's share of the batch differ.
    x = (rng.normal(size=(8, 4, 4, 8)) + np.arange(8)[:, None, None, None]).astype(np.float32)
    modulation = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)
    step = jax.jit(forward_with_stats, static_argnums=0)

    one = jax.devices()[0]
    y1, stats1 = step(graphdef, jax.device_put(state, one), jax.device_put(x, one),
                      jax.device_put(modulation, one))
    jax.block_until_ready((y1, stats1))

    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    x8 = jax.device_put(x, data)
    assert len(x8.addressable_shards) == 8 and x8.addressable_shards[0].data.shape[0] == 1
    y8, stats8 = step(graphdef, jax.device_put(state, replicated), x8,
                      jax.device_put(modulation, data))
    jax.block_until_ready((y8, stats8))

    np.testing.assert_allclose(y8, y1, rtol=1e-4, atol=1e-5)
    for (path, a), (_, b) in zip(nnx.to_flat_state(stats1), nnx.to_flat_state(stats8)):
        np.testing.assert_allclose(b[...], a[...], rtol=1e-4, atol=1e-6, err_msg=str(path))

    # Independent reference: PyTorch-style running mean after one step from 0,
    # 0.1 * mean over the *global* batch and space (norm_0 sees x itself).
    want = 0.1 * x.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(stats8["norm_0"]["norm"]["mean"][...], want, rtol=1e-5)
    per_device = 0.1 * x[:1].mean(axis=(0, 1, 2))  # what unsynchronized BN would store
    assert not np.allclose(per_device, want, rtol=1e-2)

    # Eval mode: running statistics, no power iteration, deterministic.
    block.eval()
    graphdef, state = nnx.split(block)
    a, stats_a = step(graphdef, state, x, modulation)
    b, _ = step(graphdef, state, x, modulation)
    np.testing.assert_array_equal(a, b)
    for (_, before), (_, after) in zip(nnx.to_flat_state(nnx.state(block, nnx.BatchStat)),
                                       nnx.to_flat_state(stats_a)):
        np.testing.assert_array_equal(after[...], before[...])


def gan_losses(d_real, d_fake_for_d, d_fake_for_g):
    """GAN losses + feature matching x10 over every scale, as in SPADE, except that
    D uses the logistic loss: with the hinge loss and every logit inside the margin
    (as at initialization) the gradient of the last bias is exactly 0 (as many
    +1 as -1 terms), which would hide a parameter from the gradient check."""
    d_loss = sum(jnp.mean(jax.nn.softplus(-r[-1])) + jnp.mean(jax.nn.softplus(f[-1]))
                 for r, f in zip(d_real, d_fake_for_d))
    g_loss = sum(-jnp.mean(f[-1]) for f in d_fake_for_g)
    matching = sum(jnp.mean(jnp.abs(f - jax.lax.stop_gradient(r)))
                   for rs, fs in zip(d_real, d_fake_for_g) for r, f in zip(rs[:-1], fs[:-1]))
    return d_loss, g_loss + 10 * matching / len(d_real)


def assert_trees_close(got, want, what, rtol, floor=2e-6):
    """Leaf by leaf, to `rtol` of each leaf's largest magnitude plus an absolute
    `floor`: float32 round-off in a gradient is absolute, ~1e-7 times the O(1)
    losses it comes from, so an entry whose terms cancel (or a bias before a
    BatchNorm, whose exact gradient is 0) keeps ~1e-7 of noise that no relative
    tolerance of its own tiny size allows. A wrong reduction moves whole leaves
    by O(1) of their size."""
    want_leaves, tree = jax.tree_util.tree_flatten_with_path(want)
    got_leaves = tree.flatten_up_to(got)
    for (path, a), b in zip(want_leaves, got_leaves):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=0, atol=rtol * np.abs(a).max() + floor,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.slow  # about 60 s, nearly all of it compiling the G+D step twice (1 and 8 devices)
def test_gan_step_on_8_devices_equals_the_step_on_1_device(mesh):
    """Two jitted G+D steps on a global batch sharded over 8 devices give the
    losses, gradients, parameters, BatchNorm statistics and spectral-norm
    vectors of the same two steps on one device with the whole batch: the
    all-reduces average over the global batch (a sum without the mean, a
    per-device loss or a missing all-reduce would differ by far more than
    float32's reduction order). Every parameter gets a gradient."""
    generator = RSSpadeGenerator(SOURCES, 4, ngf=2, embed_dim=4, tile_size=64, rngs=rngs(0))
    discriminator = MultiscaleDiscriminator(sum(SOURCES.values()) + 4, ndf=2, rngs=rngs(1))
    g_def, g_params, g_rest = nnx.split(generator, nnx.Param, ...)
    d_def, d_params, d_rest = nnx.split(discriminator, nnx.Param, ...)

    @jax.jit
    def step(g_params, g_rest, d_params, d_rest, sources, real):
        def losses(g_params, d_params):
            g = nnx.merge(g_def, g_params, g_rest, copy=True)
            d = nnx.merge(d_def, d_params, d_rest, copy=True)
            d_frozen = nnx.merge(d_def, jax.lax.stop_gradient(d_params), d_rest, copy=True)
            fake = g(sources)
            d_loss, g_loss = gan_losses(
                d(conditional_input(sources, real)),
                d(conditional_input(sources, jax.lax.stop_gradient(fake))),
                d_frozen(conditional_input(sources, fake)))
            new_rest = (nnx.state(g, nnx.Not(nnx.Param)), nnx.state(d, nnx.Not(nnx.Param)))
            return d_loss + g_loss, (d_loss, g_loss, fake, new_rest)

        grads, (d_loss, g_loss, fake, (g_rest, d_rest)) = jax.grad(
            losses, argnums=(0, 1), has_aux=True)(g_params, d_params)
        sgd = lambda p, g: jax.tree.map(lambda a, b: a - 1e-2 * b, p, g)  # noqa: E731
        return (sgd(g_params, grads[0]), g_rest, sgd(d_params, grads[1]), d_rest,
                grads, {"d_loss": d_loss, "g_loss": g_loss, "fake_max": jnp.abs(fake).max()})

    rng = np.random.default_rng(0)
    batch = 8
    sources = {k: rng.normal(size=(batch, s, s, c)).astype(np.float32)
               for k, c in SOURCES.items() for s in [22 if k == "dem" else 64]}
    real = rng.uniform(-1, 1, size=(batch, 64, 64, 4)).astype(np.float32)
    start = (g_params, g_rest, d_params, d_rest)

    def two_steps(state_sharding, batch_sharding):
        state = jax.device_put(start, state_sharding)
        inputs = jax.device_put((sources, real), batch_sharding)
        results = []
        for _ in range(2):
            *state, grads, metrics = step(*state, *inputs)
            jax.block_until_ready((state, grads, metrics))  # wait every step: an all-reduce rendezvous can time out otherwise
            results.append((grads, metrics))
        return state, results

    one = jax.devices()[0]
    state1, results1 = two_steps(one, one)
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    state8, results8 = two_steps(replicated, data)

    # float32 sums in another order (8 partial sums, then the all-reduce) differ
    # by a few ulps per addition: up to ~5e-6 of a leaf's size here over the ~3e4
    # terms of a gradient (BatchNorm's 1/std and the second step's dependence on
    # the first amplify it), and under a quarter of rtol + floor at worst.
    # A sum without the mean is off by 7x, a per-device gradient by O(1).
    for k, ((grads1, metrics1), (grads8, metrics8)) in enumerate(zip(results1, results8)):
        assert_trees_close(metrics8, metrics1, f"step {k} metrics", rtol=1e-5)
        assert_trees_close(grads8, grads1, f"step {k} gradients", rtol=1e-4)
    assert_trees_close(state8, state1, "state after 2 steps", rtol=1e-4)

    for grads, metrics in results8:
        assert all(np.isfinite(float(v)) for v in metrics.values())
        assert float(metrics["fake_max"]) <= 1.0
    for grad in results8[-1][0]:
        flat = nnx.to_flat_state(grad)
        dead = [path for path, g in flat if not np.any(np.asarray(g[...]) != 0)]
        assert not dead, f"parameters without gradient: {dead}"
    assert state8[0]["fc"]["kernel"][...].sharding.is_fully_replicated
    # Training mode moved the BatchNorm statistics and the spectral-norm vectors
    # (so comparing them above compared something).
    g_rest_before, g_rest_after = start[1], state8[1]
    assert not np.allclose(g_rest_after["head_0"]["norm_0"]["norm"]["mean"][...],
                           g_rest_before["head_0"]["norm_0"]["norm"]["mean"][...])
    assert not np.allclose(g_rest_after["head_0"]["conv_0"]["u"][...],
                           g_rest_before["head_0"]["conv_0"]["u"][...])


_INIT_THREE_WAYS = """
import jax, numpy as np
from flax import nnx
from rsjax import mesh as mesh_lib
from rsjax.models.patchgan import MultiscaleDiscriminator

def init():
    return nnx.state(MultiscaleDiscriminator(20, ndf=4, rngs=nnx.Rngs(0)), nnx.Param)

mesh = mesh_lib.create_mesh(jax.devices()[:1])
got = mesh_lib.init_replicated(init, mesh)
one_shot = jax.jit(init, compiler_options=mesh_lib.ONE_SHOT_CPU_OPTIONS)()
optimized = jax.jit(init)()
same = lambda x, y: all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
print(same(got, one_shot), same(got, optimized))
"""


def test_initial_state_is_compiled_with_the_one_shot_options_on_cpu(mesh):
    """init_replicated compiles with ONE_SHOT_CPU_OPTIONS on CPU (XLA's backend
    optimizations cost a cold start 10 s for a program that runs once). Seen in a
    process with XLA's default options (the tests' own flags turn them off for
    everything): its state is, bit for bit, the one-shot program's, and not the
    optimized program's (which contracts multiply-adds: round-off differs)."""
    import subprocess
    import sys

    from rsjax import mesh as mesh_lib

    assert mesh_lib.one_shot_compiler_options(mesh) == mesh_lib.ONE_SHOT_CPU_OPTIONS
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", _INIT_THREE_WAYS], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False"]
