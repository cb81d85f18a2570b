"""rsjax bench layers (rsjax.bench.layers): FLOP counting against an analytic count, and the JSON report."""
import json

import jax
import jax.numpy as jnp

from rsjax.bench import layers as bench


def test_flops_of_a_convolution_match_the_analytic_count():
    x = jnp.ones((2, 16, 16, 8))
    k = jnp.ones((3, 3, 8, 4))
    conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    compiled = jax.jit(conv).lower(x, k).compile()
    # A multiply and an add per tap of every output value (VALID: 14 x 14 outputs;
    # with SAME padding XLA leaves out the taps that fall on the zero border).
    analytic = 2 * 2 * 14 * 14 * 3 * 3 * 8 * 4
    assert abs(bench.flops_of(compiled) - analytic) / analytic < 0.05


def test_bench_reports_throughput_and_flops_as_json(capsys):
    assert bench.main(["--models", "D", "--sizes", "32", "--batches", "1,2", "--ndf", "2",
                       "--steps", "1"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)                  # stdout: the report; stderr: progress
    results = report["results"]
    assert [(r["model"], r["size"], r["batch"]) for r in results] == [("D", 32, 1), ("D", 32, 2)]
    for r in results:
        assert r["images_per_s"] > 0 and r["seconds_per_step"] > 0
    # Twice the batch, twice the work.
    assert abs(results[1]["gflop_per_step"] / max(results[0]["gflop_per_step"], 1e-9) - 2) < 0.2
    assert '"model": "D"' in captured.err
