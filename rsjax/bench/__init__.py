"""Benchmarks, each printing JSON: `rsjax bench PART [options]`.

    rsjax bench steps --parts fusion,unet --rounds 5
    rsjax bench pipeline --config synthetic_demo
    rsjax bench predict --size 2048

docs/benchmarks.md says what each measures and keeps the figures seen.
"""

# name -> (module, one-line summary), for `rsjax bench NAME` (see rsjax.cli).
SUBCOMMANDS = {
    "steps": ("rsjax.bench.steps", "the train steps (MFU, PyTorch side by side, startup, "
                                   "the input pipeline's headroom)"),
    "pipeline": ("rsjax.bench.pipeline", "the dataset build and the input pipeline"),
    "ingest": ("rsjax.bench.ingest", "ingesting your own exports"),
    "build": ("rsjax.bench.build", "the dataset build, with and without Beam"),
    "predict": ("rsjax.bench.predict", "whole-scene prediction to a COG"),
    "layers": ("rsjax.bench.layers", "single layers (throughput and FLOPs)"),
}

# `rsjax bench steps --parts ...` (options, no part named) is `rsjax bench steps ...`.
DEFAULT_SUBCOMMAND = "steps"
