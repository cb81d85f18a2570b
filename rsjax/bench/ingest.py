"""Ingestion benchmark: tiles/s on the demo scenes, peak memory on a large scene.

    rsjax bench ingest
    rsjax bench ingest --out_dir work/bench_ingest --large_size 8192
    rsjax bench ingest --skip_large

Prints one JSON object: `demo`, the tiles/s of ingesting the demo scenes (4
scenes of 512 px, 256-pixel tiles); `large`, the peak resident memory
(ru_maxrss) and tiles/s of a fresh child process that registers and tiles a
large scene (8192 px by default; S1 on a shifted grid, a geographic DEM with
voids), beside that process's memory after imports. The goal is a peak under
2 GiB whatever the scene size. The large scene is written window by window
and reused by later runs. docs/data.md keeps the figures seen.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.warp import transform_bounds

from rsjax import cli, runtime
from rsjax.data.contract import S2_BANDS, S1_BANDS, ScenePaths, find_scenes
from rsjax.data.geotiff import write_geotiff_by_windows
from rsjax.data.ingest import IngestOptions, IngestReport, iter_scene_tiles

UTM = "EPSG:32631"


def write_simple_scene(out_dir: Path, scene_id: str, size: int, seed: int = 0) -> ScenePaths:
    """A plain four-source scene for timing, cheap to write at any size (not a physical model).

    S2 in UTM 31N at 10 m; S1 linear on the same zone with an origin shifted
    by a fraction of a pixel (so it is really resampled); labels 0..8 on the
    S2 grid; a DEM in EPSG:4326 at 1 arc-second covering the footprint with a
    margin, with a few voids.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x0, y0 = 500000.0 + 20480.0 * seed, 5600000.0
    s2_t = Affine(10.0, 0.0, x0, 0.0, -10.0, y0)
    phase = rng.uniform(0, 2 * np.pi, size=4)

    def coords(window, transform):
        rows, cols = np.mgrid[window.row_off:window.row_off + window.height, 0:window.width]
        return transform @ (cols + 0.5, rows + 0.5)

    def s2(window):
        x, y = coords(window, s2_t)
        base = np.sin(x / 230.0 + phase[0]) * np.cos(y / 170.0 + phase[1])
        return np.stack([800 + 300 * base, 1000 + 350 * base, 900 + 500 * base, 2500 + 1200 * base]).astype(np.uint16)

    s1_t = Affine(10.0, 0.0, x0 - 3.0, 0.0, -10.0, y0 + 7.0)

    def s1(window):
        x, y = coords(window, s1_t)
        vv = 0.05 + 0.04 * np.sin(x / 90.0 + phase[2]) ** 2 + 0.01 * np.cos(y / 60.0)
        return np.stack([vv, vv / 5]).astype(np.float32)

    def lulc(window):
        x, y = coords(window, s2_t)
        return (((x // 970) + (y // 890)) % 9)[None].astype(np.uint8)

    west, south, east, north = transform_bounds(UTM, "EPSG:4326", x0, y0 - 10 * size, x0 + 10 * size, y0)
    arcsec = 1.0 / 3600.0
    margin = 20 * arcsec
    dem_t = Affine(arcsec, 0.0, west - margin, 0.0, -arcsec, north + margin)
    dem_w = int(np.ceil((east - west + 2 * margin) / arcsec))
    dem_h = int(np.ceil((north - south + 2 * margin) / arcsec))

    def dem(window):
        lon, lat = coords(window, dem_t)
        z = 300 + 80 * np.sin(lon * 900.0 + phase[3]) * np.cos(lat * 700.0) + 20 * np.sin(lat * 5000.0)
        z = z.astype(np.float32)
        voids = (((lon * 3600).astype(np.int64) % 97) < 3) & (((lat * 3600).astype(np.int64) % 89) < 2)
        z[voids] = -32767.0
        return z[None]

    paths = dict(
        s2=write_geotiff_by_windows(out_dir / f"{scene_id}_s2.tif", 4, size, size, "uint16", UTM, s2_t, s2,
                                    nodata=0, descriptions=S2_BANDS),
        s1=write_geotiff_by_windows(out_dir / f"{scene_id}_s1.tif", 2, size, size, "float32", UTM, s1_t, s1,
                                    nodata=float("nan"), descriptions=S1_BANDS),
        lulc=write_geotiff_by_windows(out_dir / f"{scene_id}_lulc.tif", 1, size, size, "uint8", UTM, s2_t, lulc,
                                      nodata=255, descriptions=["label"]),
        dem=write_geotiff_by_windows(out_dir / f"{scene_id}_dem.tif", 1, dem_h, dem_w, "float32", "EPSG:4326",
                                     dem_t, dem, nodata=-32767.0, descriptions=["DEM"]),
    )
    return ScenePaths(scene_id=scene_id, **paths)


def demo_scenes(out_dir: Path, num_scenes: int = 4, size: int = 512) -> tuple[list[ScenePaths], str]:
    """The demo scenes, from the synthetic generator when it is available."""
    try:
        from rsjax.data.synthetic import write_scenes  # noqa: PLC0415 - optional, lands separately
    except ImportError:
        return [write_simple_scene(out_dir, f"demo{i}", size, seed=i) for i in range(num_scenes)], "bench_ingest.write_simple_scene"
    return list(write_scenes(out_dir, num_scenes=num_scenes, size=size, seed=0)), "synthetic.write_scenes"


def time_ingestion(scenes: list[ScenePaths], opts: IngestOptions) -> dict:
    report = IngestReport()
    start = time.perf_counter()
    tiles = 0
    for scene in scenes:
        for _ in iter_scene_tiles(scene, opts, report):
            tiles += 1
    seconds = time.perf_counter() - start
    return {"tiles": tiles, "tiles_dropped_nodata": report.tiles_dropped_nodata, "seconds": round(seconds, 3),
            "tiles_per_s": round(tiles / seconds, 2) if seconds > 0 else None}


def _maxrss_mib() -> float:
    """This process's peak resident memory.

    On Linux, VmHWM of /proc/self/status: getrusage's ru_maxrss survives
    execve, so a child started from a large parent (pytest with JAX loaded)
    would report the parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024          # kB -> MiB
    except OSError:
        pass
    # Elsewhere ru_maxrss: KiB on Linux, bytes on macOS.
    scale = 1.0 if sys.platform != "darwin" else 1.0 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024


def _current_rss_mib() -> float:
    try:
        import psutil  # noqa: PLC0415
        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


def child_register(folder: Path, tile_size: int) -> dict:
    """Runs in a fresh process: registers and tiles every scene in `folder`, reports memory."""
    scenes = find_scenes(folder)
    after_imports = _current_rss_mib()
    result = time_ingestion(scenes, IngestOptions(tile_size=tile_size))
    result.update(rss_after_imports_mib=round(after_imports, 1), peak_rss_mib=round(_maxrss_mib(), 1))
    return result


def large_scene(work: Path, size: int) -> Path:
    folder = work / f"large_{size}"
    marker = folder / "complete"
    if not marker.exists():
        write_simple_scene(folder, f"large{size}", size, seed=7)
        marker.write_text("ok")
    return folder


# Old option names, still taken for one release (see rsjax.cli.rename_options).
RENAMED_OPTIONS = {"--work_dir": "--out_dir"}


def add_arguments(parser) -> None:
    parser.add_argument("--out_dir", default="work/bench_ingest", type=Path,
                        help="where the demo and large scenes are written (the large one is reused)")
    parser.add_argument("--large_size", default=8192, type=cli.positive_int,
                        help="optical pixels per side of the large scene")
    parser.add_argument("--tile_size", default=256, type=cli.positive_int, help="tile side in pixels")
    parser.add_argument("--skip_large", action="store_true", help="only time the demo scenes")
    # The large scene is registered in a fresh child process (this command
    # with --child_register FOLDER), so its peak memory is its own.
    parser.add_argument("--child_register", type=Path, help=argparse.SUPPRESS)


def benchmark(work: Path, tile_size: int = 256, large_size: int = 8192,
              skip_large: bool = False) -> dict:
    """The JSON report (see the module docstring)."""
    out = {"machine": f"{runtime.cpu_name()}, {os.cpu_count()} cores",
           "rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__}
    scenes, writer = demo_scenes(work / "demo")
    out["demo"] = {"scenes": len(scenes), "size": 512, "tile_size": tile_size, "writer": writer,
                   **time_ingestion(scenes, IngestOptions(tile_size=tile_size))}
    if not skip_large:
        start = time.perf_counter()
        folder = large_scene(work, large_size)
        write_s = time.perf_counter() - start
        proc = subprocess.run([sys.executable, "-m", "rsjax.bench.ingest", "--child_register",
                               str(folder), "--tile_size", str(tile_size)],
                              capture_output=True, text=True, check=True)
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        out["large"] = {"optical_pixels": f"{large_size}x{large_size}",
                        "write_or_reuse_s": round(write_s, 1), **child,
                        "goal_peak_rss_mib": 2048, "under_goal": child["peak_rss_mib"] < 2048}
    return out


def run(args) -> int:
    if args.child_register:
        print(json.dumps(child_register(args.child_register, args.tile_size)))
        return 0
    cli.print_json(benchmark(args.out_dir, args.tile_size, args.large_size, args.skip_large))
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
