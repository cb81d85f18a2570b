"""Write synthetic multi-source scenes (S2, S1, land cover, DEM) as GeoTIFFs.

    rsjax scenes --out_dir work/scenes --scenes 4 --size 512 --seed 0
    rsjax scenes --out_dir work/cloudy_scenes --scenes 2 --size 256 --cloudy

Per scene, `<id>_s2.tif`, `<id>_s1.tif`, `<id>_lulc.tif`, `<id>_dem.tif`
(and with `--cloudy`, `<id>_s2_cloudy.tif` and `<id>_cloudmask.tif`), shaped
like the real products so ingestion reads them as it reads real exports.
Scene ids are `synth_s{seed}_{k:03d}`; everything follows from the seed.
docs/synthetic.md describes the scene model (terrain, land cover, optics,
SAR, clouds).
"""
from __future__ import annotations

import sys

from rsjax import cli
from rsjax.data.synthetic import MIN_SIZE, write_scenes


# Old option names, still taken for one release (see rsjax.cli.rename_options).
RENAMED_OPTIONS = {"--out": "--out_dir"}


def add_arguments(parser) -> None:
    parser.add_argument("--out_dir", required=True, help="output folder (created if missing)")
    parser.add_argument("--scenes", type=cli.positive_int, default=4, help="number of scenes")
    parser.add_argument("--size", type=int, default=512,
                        help=f"S2 scene side in 10 m pixels (at least {MIN_SIZE})")
    parser.add_argument("--seed", type=int, default=0,
                        help="scene k is drawn from (seed, k); ids synth_s{seed}_{k:03d}")
    parser.add_argument("--sar_db", action="store_true", help="write S1 in dB (as Earth Engine does)")
    parser.add_argument("--cloudy", action="store_true",
                        help="also write a cloudy S2 twin and its cloud/shadow mask")


def run(args) -> int:
    scenes = write_scenes(args.out_dir, args.scenes, args.size, args.seed, sar_db=args.sar_db,
                          cloudy=args.cloudy)
    for scene in scenes:
        print(f"{scene.scene_id}: " + ", ".join(str(p) for p in scene.as_dict().values()))
    print(f"wrote {len(scenes)} scene(s) of {args.size}x{args.size} px to {args.out_dir}")
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
