"""rsjax.bench_profile: the HLO is read right (a hand-written module whose
classes are known) and a real trace puts a step's time where it is spent."""
import os

import jax
import jax.numpy as jnp
import pytest

from rsjax.bench import profiling as bench_profile

# An HLO module as XLA:CPU prints it, cut down: each ENTRY operation's class is known.
HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%region_0.1 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%a, %b)
}

%fused_computation.1 (param_0.1: f32[1,8,8,4], param_1.1: f32[3,3,4,8]) -> f32[1,8,8,8] {
  %param_0.1 = f32[1,8,8,4]{3,2,1,0} parameter(0)
  %param_1.1 = f32[3,3,4,8]{3,2,1,0} parameter(1)
  %convolution.1 = f32[1,8,8,8]{3,2,1,0} convolution(%param_0.1, %param_1.1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
  ROOT %maximum.1 = f32[1,8,8,8]{3,2,1,0} maximum(%convolution.1, %convolution.1)
}

%fused_computation.2 (param_0.2: f32[1,8,8,8]) -> f32[8] {
  %param_0.2 = f32[1,8,8,8]{3,2,1,0} parameter(0)
  %constant.2 = f32[] constant(0)
  ROOT %reduce.2 = f32[8]{0} reduce(%param_0.2, %constant.2), dimensions={0,1,2}, to_apply=%region_0.1
}

%fused_computation.3 (param_0.3: f32[8], param_1.3: f32[8]) -> f32[8] {
  %param_0.3 = f32[8]{0} parameter(0)
  %param_1.3 = f32[8]{0} parameter(1)
  %multiply.3 = f32[8]{0} multiply(%param_0.3, %param_1.3)
  ROOT %add.3 = f32[8]{0} add(%multiply.3, %param_1.3)
}

%fused_computation.4 (param_0.4: f32[1,8,8,8]) -> f32[1,8,8,8] {
  %param_0.4 = f32[1,8,8,8]{3,2,1,0} parameter(0)
  ROOT %transpose.4 = f32[1,8,8,8]{3,2,1,0} transpose(%param_0.4), dimensions={0,2,1,3}
}

%body.5 (p.5: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p.5 = (s32[], f32[8]{0}) parameter(0)
  ROOT %t.5 = (s32[], f32[8]{0}) tuple(%p.5, %p.5)
}

%cond.5 (p.6: (s32[], f32[8])) -> pred[] {
  %p.6 = (s32[], f32[8]{0}) parameter(0)
  ROOT %c.6 = pred[] constant(false)
}

ENTRY %main.9 (x: f32[1,8,8,4], w: f32[3,3,4,8]) -> (f32[8], /*index=1*/f32[1,8,8,8]) {
  %x = f32[1,8,8,4]{3,2,1,0} parameter(0)
  %w = f32[3,3,4,8]{3,2,1,0} parameter(1)
  %conv_fusion = f32[1,8,8,8]{3,2,1,0} fusion(%x, %w), kind=kOutput, calls=%fused_computation.1, metadata={op_name="jit(step)/conv_general_dilated" stack_frame_id=3}
  %reduce_fusion = f32[8]{0} fusion(%conv_fusion), kind=kInput, calls=%fused_computation.2
  %multiply_add_fusion = f32[8]{0} fusion(%reduce_fusion, %reduce_fusion), kind=kLoop, calls=%fused_computation.3
  %transpose_fusion = f32[1,8,8,8]{3,2,1,0} fusion(%conv_fusion), kind=kLoop, calls=%fused_computation.4
  %reduce-window.7 = f32[1,4,4,8]{3,2,1,0} reduce-window(%conv_fusion, %constant.8), window={size=1x2x2x1 stride=1x2x2x1}, to_apply=%region_0.1
  %concatenate.8 = f32[1,8,8,16]{3,2,1,0} concatenate(%conv_fusion, %conv_fusion), dimensions={3}
  %while.5 = (s32[], f32[8]{0}) while(%t), condition=%cond.5, body=%body.5
  ROOT %tuple.9 = (f32[8]{0}, /*index=1*/f32[1,8,8,8]{3,2,1,0}) tuple(%multiply_add_fusion, %transpose_fusion)
}
"""


def test_each_operation_is_classed_by_what_it_computes():
    instructions, computations = bench_profile.parse_hlo(HLO)
    assert instructions["conv_fusion"][0] == "fusion"
    assert instructions["tuple.9"].opcode == "tuple"       # a tuple type before the opcode
    assert instructions["tuple.9"].shape == "(f32[8], /*index=1*/f32[1,8,8,8])"
    assert instructions["reduce-window.7"].called == ["region_0.1"]
    expected = {"conv_fusion": "convolution/matmul", "reduce_fusion": "reduction",
                "multiply_add_fusion": "elementwise", "transpose_fusion": "copy/transpose",
                "reduce-window.7": "pooling", "concatenate.8": "concatenate",
                "while.5": bench_profile.CONTROL, "not_there": "other"}
    for name, cls in expected.items():
        assert bench_profile.classify(name, instructions, computations) == cls, name


def test_summary_sums_per_class_and_step_and_leaves_out_control_flow():
    events = [("conv_fusion", 0.6), ("conv_fusion", 0.6), ("reduce_fusion", 0.2),
              ("multiply_add_fusion", 0.4), ("while.5", 5.0), ("unknown.1", 0.2)]
    out = bench_profile.summarize(events, HLO, steps=2, wall_seconds=2.0)
    by = out["seconds_per_step_by_class"]
    assert by["convolution/matmul"] == pytest.approx(0.6)
    assert by["reduction"] == pytest.approx(0.1) and by["elementwise"] == pytest.approx(0.2)
    assert by["other"] == pytest.approx(0.1)
    assert out["op_seconds_per_step"] == pytest.approx(1.0)      # the while's 5 s left out
    assert out["wall_seconds_per_step"] == pytest.approx(1.0)
    assert out["operations_not_in_the_hlo"] == 1
    assert out["top_operations"][0] == ["while.5", "control", 2.5, "(s32[], f32[8])", ""]
    assert out["top_operations"][1] == ["conv_fusion", "convolution/matmul", 0.6,
                                        "f32[1,8,8,8]", "jit(step)/conv_general_dilated"]
    by_class = out["top_by_class"]
    assert [r[0] for r in by_class["elementwise"]] == ["multiply_add_fusion"]
    assert by_class["convolution/matmul"] == [out["top_operations"][1]]
    assert by_class["pooling"] == [] and "control" not in by_class


def _profile(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    return bench_profile.profile_calls(lambda: compiled(*args), compiled.as_text(), steps=2)


def test_a_real_trace_puts_a_matmul_step_in_matmul_and_an_elementwise_one_in_elementwise():
    a = jnp.ones((768, 768))
    matmul = _profile(lambda x: jnp.tanh(x @ x @ x), a)
    assert matmul["operations_not_in_the_hlo"] == 0
    assert matmul["share_by_class"]["convolution/matmul"] > 0.5
    big = jnp.ones((2048, 2048))
    pointwise = _profile(lambda x: jnp.sin(jnp.exp(x) * 3.0 + jnp.cos(x)), big)
    assert pointwise["share_by_class"]["convolution/matmul"] == 0
    assert pointwise["share_by_class"]["elementwise"] > 0.5
    # Operation time is measured, not invented: at most the cores times the wall time.
    for prof in (matmul, pointwise):
        assert 0 < prof["op_seconds_per_step"] <= prof["wall_seconds_per_step"] * os.cpu_count() * 1.05
