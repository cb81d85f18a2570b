"""Generate one optical image for every tile of a split with a trained fusion checkpoint.

    rsjax synthesize --workdir work/demo --split train
    rsjax synthesize --workdir work/demo --split train --out_dir work/generated --step 2000

One 4-band image per tile, keyed by tile id, for the segmentation
experiment's Mix dataset (`rsjax train --config segmentation:demo,data=mix
--config.data.generated_dir=DIR`). The run's saved config says which model
and dataset (`--config` replaces it). Output (default
`<workdir>/generated/<split>`): `part-00000.npz`, ... (`tile_id`, and `s2` as
uint16 reflectance x 10000, the dataset's unit) and `provenance.json`. Each
part is renamed into place when complete, so an interrupted run resumes at
the first missing part; docs/training.md says more.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Optional

import numpy as np

from rsjax import cli
from rsjax.errors import UserError

log = logging.getLogger("rsjax")


class _Range:
    """Records [start, stop) of a random-access source, for one output part."""

    def __init__(self, source, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        return self.source[self.start + i]


def _tile_id(record) -> str:
    tid = record["tile_id"]
    return tid.decode() if isinstance(tid, bytes) else str(tid)


def synthesize(config, fusion_workdir: str, split: str = "train", out: Optional[str] = None,
               step: Optional[int] = None, part_size: int = 64, scenes: str = "all") -> dict:
    """Writes one generated image per tile of `split` (of the scenes `scenes`:
    'all', or one half, see rsjax.input_pipeline.scene_half) and returns a
    summary; resumes at the first missing part."""
    import jax
    from etils import epath

    from rsjax import input_pipeline
    from rsjax.errors import ConfigError
    from rsjax.runtime import workdir_path
    from rsjax.trainers import fusion

    if jax.process_count() > 1:
        # Each host would read its own shard of every chunk and the parts would
        # not line up with their tile ids; synthesis is cheap next to training.
        raise UserError("synthesize runs on one host: start it without a coordinator "
                         "(RSJAX_COORDINATOR / JAX_COORDINATOR_ADDRESS), or on worker 0 "
                         "of the slice only.")
    batch_size = int(config.eval_batch_size)
    if batch_size % jax.device_count():
        raise ConfigError(f"config.eval_batch_size={batch_size} is not divisible by the "
                          f"{jax.device_count()} devices; set --config.eval_batch_size to a "
                          "multiple of it.")
    sources = fusion.selected_sources(config)
    # epath: a gs:// workdir or output folder works like a local one.
    out_dir = epath.Path(out or epath.Path(workdir_path(fusion_workdir)) / "generated" / split)
    out_dir.mkdir(parents=True, exist_ok=True)
    generate, step = fusion.load_inference(config, fusion_workdir, step)
    builder = input_pipeline.get_builder(config.data)
    normalizer = input_pipeline.Normalizer.from_statistics(input_pipeline.load_statistics(builder))
    source = builder.as_data_source(split=split)
    if scenes != "all":
        source = input_pipeline.SubsetSource(
            source, input_pipeline.scene_half(input_pipeline.record_scene_ids(source), scenes))
    n = len(source)
    num_parts = math.ceil(n / part_size)
    t0, done_tiles = time.time(), 0
    for part in range(num_parts):
        path = out_dir / f"part-{part:05d}.npz"
        start, stop = part * part_size, min(n, (part + 1) * part_size)
        if path.exists():                       # finished by an earlier run
            continue
        chunk = _Range(source, start, stop)
        batches = input_pipeline.batch_iterator(
            chunk, normalizer, global_batch_size=batch_size, mesh=None, train=False,
            seed=0, sources=sources, num_epochs=1)
        image = np.concatenate([np.asarray(jax.device_get(generate(batch)))
                                for batch in batches])[: len(chunk)]
        s2 = input_pipeline.image_to_s2(image, normalizer)
        tile_ids = np.array([_tile_id(chunk[i]) for i in range(len(chunk))])
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            np.savez(f, tile_id=tile_ids, s2=s2)
        tmp.replace(path)
        done_tiles += len(chunk)
        rate = done_tiles / max(time.time() - t0, 1e-9)
        left = (n - stop) / rate if rate else float("nan")
        print(f"part {part + 1}/{num_parts} | {stop}/{n} tiles | {rate:.1f} tiles/s | "
              f"ETA {left:.0f}s", flush=True)
    provenance = {"checkpoint_step": int(step), "fusion_workdir": workdir_path(fusion_workdir),
                  "dataset": str(config.data.name), "tile_size": int(config.data.tile_size),
                  "split": split, "scenes": scenes, "num_tiles": n, "sources": list(sources),
                  "generator": str(config.generator.name), "use_ema": bool(config.eval_use_ema),
                  "config": json.loads(config.to_json_best_effort())}
    (out_dir / "provenance.json").write_text(json.dumps(provenance, indent=2))
    return {"out": str(out_dir), "num_tiles": n, "checkpoint_step": int(step)}


SPLITS = ("train", "validation", "test")
# Old option names, still taken for one release (see rsjax.cli.rename_options).
RENAMED_OPTIONS = {"--fusion_workdir": "--workdir", "--out": "--out_dir"}


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", required=True,
                        help="workdir of the fusion training run (checkpoints, config.json)")
    cli.add_config_argument(parser, required=False,
                            help="the fusion training config (default: the workdir's config.json)")
    parser.add_argument("--split", default="train", choices=SPLITS,
                        help="split whose tiles get a generated image")
    parser.add_argument("--out_dir", default=None,
                        help="output folder (default: <workdir>/generated/<split>)")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint step (default: the latest)")
    parser.add_argument("--part_size", type=cli.positive_int, default=64,
                        help="tiles per output part (the unit of resuming)")
    parser.add_argument("--scenes", default="all", choices=("all", "optical", "no_optical"),
                        help="the split's scenes to generate for: all, or one half of them "
                             "(alternate scenes by sorted id)")


def run(args) -> int:
    from rsjax import evaluate

    evaluate.check_workdir(args.workdir)      # before the output folder is created
    config = cli.load_config_arg(args, workdir=args.workdir)
    if config.get("trainer") != "fusion":
        raise UserError(f"{args.workdir}: a {config.get('trainer')!r} run; synthesize "
                        "needs a fusion run (rsjax train --config fusion:...).")
    from rsjax.runtime import prepare_process

    prepare_process()
    cli.print_json(synthesize(config, args.workdir, args.split, args.out_dir, args.step,
                              args.part_size, scenes=args.scenes))
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
