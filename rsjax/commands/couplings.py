"""How much each source tells about the optical bands: held-out ridge-regression R².

    rsjax couplings --scenes_dir work/scenes   # or none: demo scenes in a temp dir

A per-pixel ridge regression predicts B2, B3, B4, B8 from each subset of the
sources (land cover, SAR, terrain); held-out blocks give each subset's R².
Prints a Markdown table and the JSON result, and exits with status 1 when a
subset does not beat its parts (on the synthetic scenes every source adds
something). docs/data.md (Measuring the couplings) describes the features and the split.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from rsjax import cli
from rsjax.data.couplings import coupling_r2, markdown_table, ordering_violations
from rsjax.errors import UserError


def _ingested_tiles(scenes_dir: str, tile_size: int):
    from rsjax.data.contract import find_scenes
    from rsjax.data.ingest import IngestOptions, iter_scene_tiles
    for scene in find_scenes(scenes_dir):
        yield from iter_scene_tiles(scene, IngestOptions(tile_size=tile_size))


# Old option names, still taken for one release (see rsjax.cli.rename_options).
RENAMED_OPTIONS = {"--json_out": "--out"}


def add_arguments(parser) -> None:
    parser.add_argument("--scenes_dir", default=None,
                        help="folder of <scene>_{s2,s1,lulc,dem}.tif (default: the demo scenes, "
                             "4 x 512 px with seed 0, written into a temporary folder)")
    parser.add_argument("--tile_size", type=cli.positive_int, default=256,
                        help="tile side in pixels for ingestion")
    parser.add_argument("--pixels_per_tile", type=cli.positive_int, default=4096,
                        help="pixels drawn per tile")
    parser.add_argument("--test_every", type=cli.positive_int, default=4,
                        help="hold out one pixel block in n")
    parser.add_argument("--block", type=cli.positive_int, default=32,
                        help="side of the held-out pixel blocks")
    parser.add_argument("--lam", type=float, default=1.0, help="ridge penalty (standardised features)")
    parser.add_argument("--seed", type=int, default=0, help="pixel sampling seed")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")


def run(args) -> int:
    from rsjax.data.contract import find_scenes

    if args.test_every < 2:
        raise UserError(f"--test_every {args.test_every}: must be at least 2 (1 would hold out "
                        "every pixel and leave none to fit).")
    if args.lam < 0:
        raise UserError(f"--lam {args.lam}: the ridge penalty must be 0 or more.")
    if args.scenes_dir is not None:
        find_scenes(args.scenes_dir)          # a missing folder or scene: one error line, first
    with tempfile.TemporaryDirectory(prefix="rsjax_couplings_") as tmp:
        scenes_dir = args.scenes_dir
        if scenes_dir is None:
            from rsjax.data.synthetic import write_scenes
            write_scenes(tmp, num_scenes=4, size=512, seed=0)
            scenes_dir = tmp
        result = coupling_r2(_ingested_tiles(scenes_dir, args.tile_size), lam=args.lam,
                             pixels_per_tile=args.pixels_per_tile, test_every=args.test_every,
                             block=args.block, seed=args.seed)
    violations = ordering_violations({k: v["r2"] for k, v in result["subsets"].items()})
    result["ordering_holds"] = not violations
    result["violations"] = violations
    print(markdown_table(result))
    print()
    print(json.dumps(result, indent=1))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    if violations:
        print("ordering violated:\n  " + "\n  ".join(violations), file=sys.stderr)
        return 1
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
