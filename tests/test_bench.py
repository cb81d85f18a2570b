"""rsjax bench: the JSON report's figures are consistent with each other,
the FLOP count with an analytic one, and the MFU with the measured peak."""
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsjax.bench import steps as bench
from rsjax.errors import RunFailed


def test_matmul_peak_is_the_best_size():
    peak = bench.matmul_peak("float32", (128, 256), repeats=2)
    by_size = peak["gflop_per_s_by_size"]
    assert set(by_size) == {"128", "256"} and min(by_size.values()) > 0
    assert peak["gflop_per_s"] == max(by_size.values())


def test_compiled_flops_of_a_matmul_match_the_analytic_count():
    a = jnp.ones((64, 96))
    b = jnp.ones((96, 32))
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    assert bench.compiled_flops(compiled) == pytest.approx(2 * 64 * 96 * 32, rel=0.01)


def test_reference_ratio_is_only_given_for_the_full_model_at_batch_1():
    full = bench.add_reference({"size": 128, "batch": 1, "dtype": "float32",
                                "images_per_s": 0.5})
    # The reference is 2.37 s per image: 0.5 images/s is 1.185x.
    assert full["speedup_vs_pytorch"] == pytest.approx(0.5 * 2.37, abs=0.01)
    for other in ({"size": 128, "batch": 4, "dtype": "float32", "images_per_s": 1.0},
                  {"size": 128, "batch": 1, "dtype": "bfloat16", "images_per_s": 1.0},
                  {"size": 128, "batch": 1, "dtype": "float32", "images_per_s": 1.0,
                   "config_arg": "demo"},
                  {"size": 64, "batch": 1, "dtype": "float32", "images_per_s": 1.0}):
        assert "speedup_vs_pytorch" not in bench.add_reference(dict(other))


def test_bench_reports_steps_mfu_and_pipeline_headroom_as_json(demo_data_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--parts", "matmul,fusion,unet,pipeline", "--sizes", "64",
                       "--batches", "2", "--steps", "1", "--config_arg", "demo",
                       "--matmul_sizes", "512", "--data_dir", str(demo_data_dir),
                       "--profile", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == report
    # The load others put on the machine, at the start and the end of the run.
    for load in (report["machine"]["loadavg_1_5_15_min"], report["loadavg_1_5_15_min_at_end"]):
        assert len(load) == 3 and min(load) >= 0
    peak = report["matmul_peak"]["gflop_per_s"]
    for part in ("fusion", "unet"):
        (entry,) = report[part]
        assert (entry["size"], entry["batch"], entry["config_arg"]) == (64, 2, "demo")
        assert entry["images_per_s"] == pytest.approx(2 / entry["seconds_per_step"], rel=0.01)
        assert entry["gflop_per_step"] > 0
        assert entry["gflop_per_s"] == pytest.approx(
            entry["gflop_per_step"] / entry["seconds_per_step"], rel=0.01)
        assert entry["mfu"] == pytest.approx(entry["gflop_per_s"] / peak, abs=0.002)
        # --profile: every traced operation found in the step's HLO and classed
        # (the demo models are narrow: their elementwise work weighs as much as
        # their convolutions, so only that both are there is asserted).
        prof = entry["profile"]
        assert prof["operations_not_in_the_hlo"] == 0 and prof["op_seconds_per_step"] > 0
        assert sum(prof["share_by_class"].values()) == pytest.approx(1.0, abs=0.01)
        assert prof["share_by_class"]["convolution/matmul"] > 0.1
        assert prof["share_by_class"]["elementwise"] > 0
    # The GAN step (two networks, two updates) costs more than the U-Net's.
    assert report["fusion"][0]["gflop_per_step"] > report["unet"][0]["gflop_per_step"]
    pipe = report["pipeline"]
    assert pipe["megapixels_per_s"] == pytest.approx(
        pipe["tiles_per_s"] * 64 * 64 / 1e6, rel=0.01)
    (headroom,) = pipe["against_fusion_step"]
    need = report["fusion"][0]["images_per_s"] * 64 * 64 / 1e6
    assert headroom["pipeline_over_step"] == pytest.approx(pipe["megapixels_per_s"] / need,
                                                           rel=0.05)


def test_bench_times_the_flow_models_step_and_its_sampler_at_each_step_count(capsys):
    assert bench.main(["--parts", "flow", "--sizes", "32", "--batches", "2", "--steps", "1",
                       "--config_arg", "demo", "--flow_sample_steps", "1,3"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["flow"]
    step = entry["train_step"]
    assert (step["size"], step["batch"]) == (32, 2) and step["gflop_per_step"] > 0
    one, three = entry["sampling"]
    assert (one["sample_steps"], three["sample_steps"], one["solver"]) == (1, 3, "euler")
    for e in (one, three):
        assert e["images_per_s"] == pytest.approx(2 / e["seconds_per_batch"], rel=0.01)
        assert e["gflop_per_s"] == pytest.approx(e["gflop_per_batch"] / e["seconds_per_batch"],
                                                 rel=0.01)
    # The counts against independent ones: the convolutions and matrix products
    # of the network's jaxpr (elementwise work is what XLA adds). One Euler step
    # is one whole network; each further step, one velocity evaluation (the
    # sources' part is computed once).
    from flax import nnx

    from rsjax.trainers import fusion
    config = bench.fusion_config(32, 2, "float32", bench.flow_arg("demo"))
    sources = fusion.selected_sources(config)
    setup = fusion.make_setup(config, sources)
    batch = {s: jnp.zeros((2, 32, 32, c)) for s, c in
             {"lulc": 9, "s1": 2, "dem": 5}.items() if s in sources}

    x, t = jnp.zeros((2, 32, 32, 4)), jnp.full((2,), 0.5)

    def forward(params):
        return nnx.merge(setup.eval_graph, params)(x, t, batch)

    def velocity(params, condition):
        return nnx.merge(setup.eval_graph, params).velocity(x, t, condition)
    from rsjax.models import cpu_conv
    params = jax.eval_shape(setup.init_state)["model"]
    condition = jax.eval_shape(lambda p: nnx.merge(setup.eval_graph, p).condition(batch, (32, 32)),
                               params)
    with cpu_conv.rewrites("off"):        # as the bench counts: plain convolutions
        whole = bench.jaxpr_flops(jax.make_jaxpr(forward)(params).jaxpr) / 1e9
        one_velocity = bench.jaxpr_flops(jax.make_jaxpr(velocity)(params, condition).jaxpr) / 1e9
    assert whole == pytest.approx(one["gflop_per_batch"], rel=0.1), whole
    assert 2 * one_velocity == pytest.approx(three["gflop_per_batch"] - one["gflop_per_batch"],
                                             rel=0.1), one_velocity
    assert one_velocity < 0.7 * whole        # the sources' part is most of the work


def test_bench_rejects_unknown_parts_and_indivisible_batches(capsys):
    assert bench.main(["--parts", "fusion,gpu"]) == 2       # argparse: a bad --parts value
    assert "unknown gpu" in capsys.readouterr().err
    devices = max(2, jax.device_count())
    assert bench.main(["--batches", "3", "--devices", str(devices)]) == 2
    err = capsys.readouterr().err
    assert "error: --" in err and "Traceback" not in err
    assert bench.main(["--parts", "fusion", "--config_arg", "demo,nosuchkey"]) == 2
    assert "nosuchkey" in capsys.readouterr().err


def test_model_flops_count_the_convolution_rewrites_in_full():
    from flax import nnx

    from rsjax.models import layers

    # 3x3, 8 -> 128 channels on 64x64: on CPU the kernel gradient runs as a
    # loop over 2 chunks of rows, whose body XLA's cost analysis counts once.
    conv = layers.Conv2d(8, 128, 3, use_bias=False, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 64, 64, 8))

    graphdef, kernel = nnx.split(conv)

    @jax.jit
    def step(kernel, x):
        def loss(kernel, x):
            return jnp.sum(nnx.merge(graphdef, kernel)(x) ** 2)  # needs the forward
        return jax.grad(loss, argnums=(0, 1))(kernel, x)

    # Forward, input gradient, kernel gradient: 3 x 2 x taps x C x O per pixel
    # (SAME padding: XLA leaves out the taps on the zero border, a few %).
    analytic = 3 * 2 * 64 * 64 * 9 * 8 * 128
    assert bench.model_flops(step, kernel, x) == pytest.approx(analytic, rel=0.05)
    from rsjax.models import cpu_conv
    if cpu_conv.rewrite_for(conv.kernel.shape, 1, conv.padding, x) == "row_kernel_grad":
        counted = bench.compiled_flops(step.lower(kernel, x).compile())
        assert counted < 0.9 * analytic


def _conv_grad_step():
    """A 3x3, 8 -> 128 convolution's forward and both gradients on 64x64, and
    its analytic FLOPs counting every tap: 3 x 2 x pixels x taps x C x O."""
    x = jnp.ones((1, 64, 64, 8))
    kernel = jnp.ones((3, 3, 8, 128))

    @jax.jit
    def step(kernel, x):
        def loss(kernel, x):
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jnp.sum(y ** 2)
        return jax.grad(loss, argnums=(0, 1))(kernel, x)

    return step, (kernel, x), 3 * 2 * 64 * 64 * 9 * 8 * 128


def test_jaxpr_flops_count_every_convolution_of_the_gradient():
    step, args, analytic = _conv_grad_step()
    assert bench.jaxpr_flops(step.trace(*args).jaxpr) == analytic
    # The same count as XLA's cost analysis, up to the taps on the zero border it skips.
    assert bench.jaxpr_flops(step.trace(*args).jaxpr) == pytest.approx(
        bench.model_flops(step, *args), rel=0.05)


def test_jaxpr_flops_multiply_scans_and_take_the_costlier_branch():
    a = jnp.ones((16, 32))
    b = jnp.ones((32, 8))

    def f(a, b, pred):
        def body(carry, _):
            return carry + a @ b, None                     # 2 x 16 x 8 x 32 each
        out, _ = jax.lax.scan(body, jnp.zeros((16, 8)), None, length=5)
        cheap = lambda: out                                 # noqa: E731
        dear = lambda: out @ jnp.ones((8, 64)) @ jnp.ones((64, 8))  # noqa: E731
        return jax.lax.cond(pred, dear, cheap)

    jaxpr = jax.make_jaxpr(f)(a, b, True)
    assert bench.jaxpr_flops(jaxpr) == 5 * 2 * 16 * 8 * 32 + 2 * 16 * 64 * 8 + 2 * 16 * 8 * 64


def test_model_flops_fall_back_to_the_jaxpr_when_xla_gives_no_count(monkeypatch):
    """What happened on an H200 with jax 0.11.2: the CPU lowering's cost
    analysis had no "flops", so the bench printed no MFU."""
    step, args, analytic = _conv_grad_step()
    assert bench.model_flops_and_source(step, *args)[1] == "xla_cost_analysis"
    monkeypatch.setattr(bench, "compiled_flops", lambda lowered: None)
    assert bench.model_flops_and_source(step, *args) == (analytic, "jaxpr")


def test_fusion_reference_is_marked_as_recorded():
    entry = bench.add_reference({"size": 256, "batch": 1, "dtype": "float32",
                                 "images_per_s": 0.2})
    assert entry["pytorch_reference"] == "recorded, not same-run"
    assert entry["speedup_vs_pytorch"] == pytest.approx(0.2 * 6.49, abs=0.01)
    assert "speedup_vs_pytorch_at_equal_peak" not in entry       # no peak measured
    # Measured at a matmul peak of 300 GFLOP/s; this run's is 150: the machine
    # ran at half speed, so at equal peaks rsjax's 0.2 images/s count double.
    scaled = bench.add_reference({"size": 256, "batch": 1, "dtype": "float32",
                                  "images_per_s": 0.2}, peak_gflops=150.0)
    assert scaled["pytorch_reference_matmul_peak_gflop_per_s"] == 300.0
    assert scaled["speedup_vs_pytorch_at_equal_peak"] == pytest.approx(2 * 0.2 * 6.49, abs=0.02)


def test_torch_unets_layout_is_rs_unets():
    """The layout the PyTorch U-Net of `--against torch` is built from gives
    RS-UNet's parameters, name for name and shape for shape (the full model's
    82,428,169 and the demo's width 16); no PyTorch needed. The PyTorch model
    checks its own count against the layout when built, and the bench refuses a
    comparison whose counts differ."""
    from flax import nnx

    from rsjax.bench import pytorch as bench_torch
    from rsjax.models.param_table import abstract_model

    for width in (64, 16):
        model = abstract_model("rs_unet", in_channels=4, num_classes=9, width=width)
        ours = {".".join(map(str, path)): tuple(value.shape)
                for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        layout = bench_torch.unet_layout(width=width)
        assert bench_torch.layout_parameter_shapes(layout) == ours
        assert sum(np.prod(s) for s in ours.values()) == bench.unet_parameters(
            "" if width == 64 else "demo")
    assert bench.unet_parameters() == bench_torch.RS_UNET_PARAMETERS == 82_428_169


# PyTorch's figures for RS-UNet at 4x256, as `python -m rsjax.bench.pytorch` printed them.
TORCH_ENTRY = {"framework": "pytorch", "torch_version": "2.13.0+cpu", "threads": 2,
               "batch": 4, "size": 256, "dtype": "float32", "width": 64, "depth": 5,
               "parameters": 82_428_169, "seconds_per_step": 8.0, "seconds_min": 7.9,
               "images_per_second": 0.5, "first_step_seconds": 9.0, "steps": 3}


def test_torch_comparison_reports_the_ratio_and_both_mfus():
    entry = {"size": 256, "batch": 4, "dtype": "float32", "seconds_per_step": 10.0,
             "images_per_s": 0.4, "gflop_per_step": 1324.0, "gflop_per_s": 132.4}
    bench.add_ratios(entry, 200.0, 1)
    bench.add_torch_comparison(entry, dict(TORCH_ENTRY), 82_428_169, 200.0)
    assert entry["mfu"] == pytest.approx(132.4 / 200, abs=0.001)
    torch_fields = entry["pytorch"]
    assert torch_fields["seconds_per_step"] == 8.0 and torch_fields["threads"] == 2
    # The same model's FLOPs in PyTorch's time: 1324 / 8 = 165.5 GFLOP/s.
    assert torch_fields["gflop_per_s"] == pytest.approx(165.5)
    assert torch_fields["mfu"] == pytest.approx(165.5 / 200, abs=0.001)
    assert entry["speedup_vs_pytorch"] == pytest.approx(0.4 / 0.5)
    with pytest.raises(RunFailed, match="not the same layout"):
        bench.add_torch_comparison(dict(entry), dict(TORCH_ENTRY), 5_156_425, 200.0)


def test_rounds_report_each_ratio_and_their_spread():
    entry = bench.add_rounds({}, [(10.0, 8.0), (5.0, 8.0), (4.0, 10.0)])
    rounds = entry["speedup_vs_pytorch_rounds"]
    assert rounds["speedup"] == [0.8, 1.6, 2.5]
    assert (rounds["median"], rounds["min"], rounds["max"]) == (1.6, 0.8, 2.5)
    assert rounds["rsjax_seconds"] == [10.0, 5.0, 4.0]


TORCH_ARGV = ["--parts", "matmul,unet", "--sizes", "32", "--batches", "2", "--steps", "1",
              "--config_arg", "demo", "--matmul_sizes", "256", "--against", "torch", "--rounds", "2"]

def test_bench_against_torch_without_pytorch_says_how_to_install_it(capsys, monkeypatch):
    """Without PyTorch (the lookup of the module finds nothing, as on a machine
    without the bench extra), `--against torch` fails before timing anything,
    saying how to install it, in one line."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torch" else find_spec(name, *args))
    assert bench.main(TORCH_ARGV) == 2
    captured = capsys.readouterr()
    assert "pip install 'rsjax[bench]'" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_bench_against_torch_runs_pytorchs_step_in_the_same_run(capsys):
    """With PyTorch (in the test extra), `--against torch` times PyTorch's step of
    the same U-Net (here the demo's, at 32 px) in a subprocess and reports the
    ratio."""
    pytest.importorskip("torch", reason="PyTorch (CPU) is in the test extra")
    argv = TORCH_ARGV
    assert bench.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["machine"]["loadavg_1_5_15_min"]) == 3
    (entry,) = report["unet"]
    torch_entry = entry["pytorch"]
    assert torch_entry["parameters"] == entry["parameters"] == bench.unet_parameters("demo")
    assert torch_entry["seconds_per_step"] > 0
    assert torch_entry["images_per_second"] == pytest.approx(
        2 / torch_entry["seconds_per_step"], rel=0.01)
    assert entry["speedup_vs_pytorch"] == pytest.approx(
        entry["images_per_s"] / torch_entry["images_per_second"], rel=0.01)
    peak = report["matmul_peak"]["gflop_per_s"]
    assert torch_entry["mfu"] == pytest.approx(torch_entry["gflop_per_s"] / peak, abs=0.002)
    rounds = entry["speedup_vs_pytorch_rounds"]
    assert len(rounds["speedup"]) == 2 and rounds["rsjax_seconds"][0] == entry["seconds_per_step"]
    assert rounds["speedup"][0] == pytest.approx(entry["speedup_vs_pytorch"], rel=0.01)


def test_bench_against_torch_checks_its_arguments_first(capsys):
    for argv, what in ((["--parts", "fusion"], "add unet or convs to --parts"),
                       (["--parts", "unet", "--sizes", "48"], "not a multiple of 32")):
        assert bench.main([*argv, "--against", "torch"]) == 2
        err = capsys.readouterr().err
        assert what in err and "Traceback" not in err
    assert bench.main(["--parts", "unet", "--rounds", "2"]) == 2
    assert "add --against torch" in capsys.readouterr().err


def _rs_unet_3x3_convs(size: int, width: int) -> list[tuple[int, int, int]]:
    """(in, out, input resolution) of every 3x3 convolution in RS-UNet's forward
    pass at `size` px, read from the traced model itself (plain convolutions)."""
    from flax import nnx

    from rsjax.models import create_model, cpu_conv
    model = create_model("rs_unet", in_channels=4, num_classes=9, width=width,
                         rngs=nnx.Rngs(0))
    model.eval()              # BatchNorm reads its statistics, writes none in the trace
    with cpu_conv.rewrites("off"):
        jaxpr = jax.make_jaxpr(lambda x: model(x))(jnp.zeros((1, size, size, 4)))
    return sorted((e.invars[1].aval.shape[2], e.invars[1].aval.shape[3],
                   e.invars[0].aval.shape[1])
                  for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"
                  and e.invars[1].aval.shape[:2] == (3, 3))


def test_unet_conv_layers_are_the_models_convolutions():
    """`bench_torch.unet_conv_layers` lists the 3x3 convolutions RS-UNet's traced
    forward pass runs, each as often as it runs it, and only the first reads
    the image (no input gradient)."""
    from rsjax.bench import pytorch as bench_torch
    for size, width in ((64, 16), (256, 64)):
        layers = bench_torch.unet_conv_layers(size, width=width)
        listed = sorted((l["in"], l["out"], l["resolution"])
                        for l in layers for _ in range(l["count"]))
        assert listed == _rs_unet_3x3_convs(size, width)
        assert all(l["count"] == len(l["names"]) for l in layers)
        (first,) = [l for l in layers if not l["input_grad"]]
        assert first["names"] == ["encoders.0.conv_0"] and first["in"] == 4


@pytest.mark.parametrize("input_grad", [True, False])
def test_conv_layer_step_computes_the_gradients_its_flop_count_says(input_grad):
    """Each layer's GFLOP (forward, kernel gradient, input gradient where the
    step needs it) is what an independent count of the convolutions in the
    traced function finds, and the function's gradients are jax.grad's of the
    plain convolution (whatever path `layers.Conv2d` takes)."""
    from rsjax.bench import pytorch as bench_torch
    from rsjax.models import cpu_conv
    layer = {"in": 8, "out": 64, "resolution": 16, "input_grad": input_grad, "count": 1,
             "names": ["x"]}
    with cpu_conv.rewrites("off"):
        fn, args, path = bench.conv_layer_step(layer, 2, "float32")
        assert path == "xla"
        counted = bench.jaxpr_flops(jax.make_jaxpr(fn)(*args))
    assert counted == pytest.approx(bench_torch.conv_layer_gflop(layer, 2) * 1e9, rel=1e-9)
    assert bench_torch.conv_layer_gflop(layer, 2) == pytest.approx(
        2 * 2 * 16 * 16 * 8 * 64 * 9 * (3 if input_grad else 2) / 1e9)

    fn, (params, x, dy), path = bench.conv_layer_step(layer, 2, "float32")
    grads = fn(params, x, dy)
    kernel = params["kernel"][...]

    def plain(kernel, x):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y * dy)

    want_k, want_x = jax.grad(plain, argnums=(0, 1))(kernel, x)
    np.testing.assert_allclose(grads[0]["kernel"][...], want_k, rtol=2e-4, atol=2e-3)
    if input_grad:
        np.testing.assert_allclose(grads[1], want_x, rtol=2e-4, atol=2e-4)
    else:
        assert len(grads) == 1


def test_torch_convs_are_matched_layer_by_layer():
    layers = [{"in": 4, "out": 64, "resolution": 32, "input_grad": False, "count": 1,
               "gflop": 1.0, "seconds": 0.5},
              {"in": 64, "out": 64, "resolution": 32, "input_grad": True, "count": 2,
               "gflop": 3.0, "seconds": 1.0}]
    entry = {"layers": [dict(l) for l in layers], "total": bench.conv_totals(layers)}
    assert entry["total"] == {"seconds": 2.5, "gflop": 7.0, "gflop_per_s": 2.8}
    theirs = {"torch_version": "2.13.0+cpu", "threads": 2, "layers": [
        {"in": 64, "out": 64, "resolution": 32, "input_grad": True, "seconds": 2.0},
        {"in": 4, "out": 64, "resolution": 32, "input_grad": False, "seconds": 1.0}]}
    bench.add_torch_convs(entry, theirs, 10.0)
    assert [l["speedup_vs_pytorch"] for l in entry["layers"]] == [2.0, 2.0]
    assert entry["pytorch"]["total"]["seconds"] == 5.0
    assert entry["pytorch"]["total"]["mfu"] == pytest.approx(0.14)
    assert entry["total"]["speedup_vs_pytorch"] == 2.0
    theirs["layers"].pop()
    with pytest.raises(RunFailed, match="not the same layers"):
        bench.add_torch_convs({"layers": [dict(l) for l in layers],
                               "total": bench.conv_totals(layers)}, theirs)


def test_bench_convs_time_every_layer_beside_pytorchs(capsys):
    """`--parts convs` times the demo U-Net's convolutions at 32 px one by one
    and PyTorch's of the same layers in the same run (PyTorch is in the test extra)."""
    argv = ["--parts", "matmul,convs", "--sizes", "32", "--batches", "2", "--steps", "1",
            "--config_arg", "demo", "--matmul_sizes", "256"]
    pytest.importorskip("torch", reason="PyTorch (CPU) is in the test extra")
    assert bench.main(argv + ["--against", "torch"]) == 0
    report = json.loads(capsys.readouterr().out)
    (entry,) = report["convs"]
    assert sum(l["count"] for l in entry["layers"]) == 22      # 2 per double conv, 11 of them
    for layer in entry["layers"]:
        assert layer["gflop_per_s"] == pytest.approx(layer["gflop"] / layer["seconds"],
                                                     rel=0.01, abs=0.051)
    assert entry["total"]["mfu"] == pytest.approx(
        entry["total"]["gflop_per_s"] / report["matmul_peak"]["gflop_per_s"], abs=0.002)
    # PyTorch's side, the same layers in the same run.
    assert entry["total"]["speedup_vs_pytorch"] == pytest.approx(
        entry["pytorch"]["total"]["seconds"] / entry["total"]["seconds"], rel=0.01)
    assert all(l["pytorch_seconds"] > 0 for l in entry["layers"])
    assert bench.main(["--parts", "convs", "--sizes", "48"]) == 2
    assert "not a multiple of 32" in capsys.readouterr().err


def test_bench_times_the_cloud_removal_steps_of_both_models(capsys):
    assert bench.main(["--parts", "uncrtaints,dsen2cr", "--sizes", "16", "--batches", "2",
                       "--steps", "1", "--config_arg", "demo"]) == 0
    report = json.loads(capsys.readouterr().out)
    for part in ("uncrtaints", "dsen2cr"):
        (entry,) = report[part]
        assert (entry["size"], entry["batch"], entry["config_arg"]) == (16, 2, "demo")
        assert entry["images_per_s"] == pytest.approx(2 / entry["seconds_per_step"], rel=0.01)
        assert entry["gflop_per_step"] > 0
    # UnCRtainTS keeps 128 channels at full resolution through 6 blocks, the demo
    # DSen2-CR 64 through 6 residual blocks of two 3x3 convolutions: per pixel
    # 0.41 M against 0.45 M multiply-adds in their convolutions (UnCRtainTS has
    # more normalisation and activations), so within a factor of two.
    ratio = report["uncrtaints"][0]["gflop_per_step"] / report["dsen2cr"][0]["gflop_per_step"]
    assert 0.5 < ratio < 2.0
