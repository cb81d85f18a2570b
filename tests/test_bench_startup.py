"""`rsjax bench steps --parts startup`: the one-step train command in fresh processes,
cold and warm compilation cache, its seconds by phase."""
from __future__ import annotations

# The tests' tiny pix2pix (trainer_utils.tiny_fusion_config), one step, no grids.
TINY = ("--config.generator.ngf=4", "--config.discriminator.ndf=4",
        "--config.global_batch_size=8", "--config.eval_batch_size=8",
        "--config.image_every_steps=0", "--config.eval_every_steps=0",
        "--config.final_eval_split=", "--config.optim.decay_start_step=100000")


def test_startup_times_a_cold_then_a_warm_first_step(demo_data_dir):
    from rsjax.bench import startup as bench_startup

    out = bench_startup.startup(str(demo_data_dir), "fusion:demo,model=pix2pix", TINY)
    assert out["command"].startswith("rsjax train --config fusion:demo,model=pix2pix --config.total_steps=1")
    cold, warm = out["cold"], out["warm"]
    for run in (cold, warm):
        assert run["exit_code"] == 0
        assert not run["tensorflow_imported"]                 # training never imports TensorFlow
        assert 0 < run["interpreter_and_imports_s"] < run["first_step_s"] <= run["total_s"]
        assert run["trace_s"] > 0 and run["lower_s"] > 0
    # The first run compiled the steps and filled the cache; the second loaded
    # them (the cache keeps programs that took 2 s or more to compile: how many
    # of the tiny model's do depends on the machine's speed, at least the step).
    assert cold["cache_hits"] == 0 and cold["compile_s"] > 0
    assert warm["cache_hits"] >= 1 and warm["compile_s"] < cold["compile_s"], out
    assert warm["programs"] == cold["programs"] > 0
