"""A user's journey with their own exports, by the README's own commands.

From a non-editable install (a venv that sees this environment's
dependencies, holding its own copy of rsjax), in a fresh current directory
with a fresh HOME: the README's "Your own data" commands run on scenes
shaped like real exports (S1 in EPSG:4326 and in dB, int32 land cover
covering part of a scene, DEM voids of -32767 without a nodata tag), then on
the real WorldCereal sample, to predicted COGs. The training command gets a
small model and a few steps (`,demo` and overrides), nothing else changes.
Also: a dataset built from other files or another tile size is never taken,
and nothing is written outside the paths the commands name.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.warp import Resampling, calculate_default_transform, reproject

from test_install import _source_copy

ROOT = Path(__file__).resolve().parents[1]
SCENES, SIZE, TILE = 4, 384, 64
# Small enough to train two steps in seconds; the dataset's tiles are the user's.
TRAIN_EXTRA = ["--config.data.tile_size=64", "--config.total_steps=2",
               "--config.global_batch_size=2", "--config.eval_batch_size=2",
               "--config.log_every_steps=1", "--config.image_every_steps=0",
               "--config.checkpoint_every_steps=2", "--config.generator.ngf=4",
               "--config.discriminator.ndf=4", "--config.generator.embed_dim=4",
               "--config.generator.spade_hidden=8", "--config.eval_max_batches=2"]


def readme_journey() -> list[list[str]]:
    """The `rsjax ...` lines of the README's "Your own data" command block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("rsjax ")]


# ----------------------------------------------------------------- the exports
def _rewrite(path: Path, edit) -> None:
    """Rewrites a GeoTIFF through `edit(data, profile, descriptions) -> (data, profile, descriptions)`."""
    with rasterio.open(path) as src:
        data, profile, descriptions = src.read(), dict(src.profile), src.descriptions
    data, profile, descriptions = edit(data, profile, descriptions)
    path.unlink()
    profile.update(count=data.shape[0], dtype=data.dtype.name)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, text in enumerate(descriptions, start=1):
            if text:
                dst.set_band_description(i, text)


def _to_4326(data, profile, descriptions):
    """S1 as Earth Engine exports it by default: EPSG:4326."""
    src_crs, src_transform = profile["crs"], profile["transform"]
    h, w = data.shape[1:]
    left, top = src_transform * (0, 0)
    right, bottom = src_transform * (w, h)
    transform, width, height = calculate_default_transform(src_crs, "EPSG:4326", w, h,
                                                           left, bottom, right, top)
    out = np.full((data.shape[0], height, width), np.nan, np.float32)
    reproject(data, out, src_transform=src_transform, src_crs=src_crs, src_nodata=np.nan,
              dst_transform=transform, dst_crs="EPSG:4326", dst_nodata=np.nan,
              resampling=Resampling.bilinear)
    profile.update(crs="EPSG:4326", transform=transform, width=width, height=height)
    return out, profile, descriptions


def _int32_partial_labels(data, profile, descriptions):
    """Land cover as int32 (as an Earth Engine `label` composite may come),
    covering only the left three quarters of the scene: the rest is outside
    the export, nodata, never a class."""
    out = data.astype(np.int32)
    out[:, :, out.shape[2] * 3 // 4:] = 255
    profile.update(nodata=255)
    return out, profile, ("label",)


def _voids_without_nodata_tag(data, profile, descriptions):
    """A DEM whose voids are -32767 with no nodata declared in the file."""
    out = data.copy()
    out[:, 5:8, 5:8] = -32767.0
    profile.pop("nodata", None)
    profile["nodata"] = None
    return out, profile, descriptions


def write_export_like_scenes(folder: Path) -> list[str]:
    from rsjax.data.synthetic import write_scenes

    # Seed 1: a draw of scenes whose blocks put tiles in every split (with few
    # blocks a 7:2:1 hash can leave one empty, which the build refuses).
    scenes = write_scenes(folder, num_scenes=SCENES, size=SIZE, seed=1, sar_db=True)
    for k, scene in enumerate(scenes):
        _rewrite(Path(scene.dem), _voids_without_nodata_tag)
        if k != 1:
            _rewrite(Path(scene.s1), _to_4326)
        if k == 2:
            _rewrite(Path(scene.lulc), _int32_partial_labels)
    return [scene.scene_id for scene in scenes]


def belgium_as_exports(tests_data: Path, folder: Path) -> str:
    """The real WorldCereal sample as a user would lay it out: its cropland map
    (1 = crop) recoded by the user to Dynamic World, roughly (crops = 4, the
    rest grass = 2: a legend of two classes has no better match)."""
    sample = tests_data / "worldcereal_belgium_2021"
    folder.mkdir(parents=True)
    for source in ("s2", "s1", "dem"):
        shutil.copy(sample / f"belgium_{source}.tif", folder / f"belgium_{source}.tif")
    with rasterio.open(sample / "belgium_cropland.tif") as src:
        crop, profile = src.read(1), dict(src.profile)
    profile.update(dtype="uint8", nodata=255, count=1)
    with rasterio.open(folder / "belgium_lulc.tif", "w", **profile) as dst:
        dst.write(np.where(crop == 1, 4, 2).astype(np.uint8), 1)
        dst.set_band_description(1, "label")
    return "belgium"


# ----------------------------------------------------------------- the install
@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`rsjax` of a non-editable install: a venv over this environment's
    packages (so nothing is downloaded) that holds its own built copy."""
    base = tmp_path_factory.mktemp("install")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    source = _source_copy(base / "src")
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    shutil.rmtree(source)          # the install must not need its source
    return venv / "bin" / "rsjax"


class User:
    """Runs commands as a user in `home/work`, with HOME set to `home`."""

    def __init__(self, rsjax: Path, home: Path):
        self.rsjax, self.home, self.cwd = rsjax, home, home / "work"
        self.cwd.mkdir(parents=True)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("TFDS_DATA_DIR", "RSJAX_CACHE_DIR", "PYTHONPATH")}
        # One CPU device, as on a user's machine (the tests' other XLA flags,
        # which only make compiling faster, stay).
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        self.env.update(HOME=str(home), PYTHONUNBUFFERED="1", XLA_FLAGS=" ".join(flags))

    def __call__(self, argv: list[str], expect: int = 0, timeout: int = 420):
        assert argv[0] == "rsjax"
        done = subprocess.run([str(self.rsjax), *argv[1:]], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == expect, (f"{shlex.join(argv)} -> {done.returncode}\n"
                                           f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        assert "Traceback" not in done.stderr, done.stderr[-5000:]
        return done


def _adapt(argv: list[str], exports: str, scene: str) -> list[str]:
    """A README line with the test's folder and scene, and a tiny model to train."""
    out = [a.replace("exports/area1", f"{exports}/{scene}").replace("area1", scene)
           .replace("=exports", f"={exports}") for a in argv]
    out = [exports if a in ("exports", "exports/") else a for a in out]
    if out[1] == "train":
        i = out.index("--config") + 1
        out[i] = out[i] + ",demo"
        out += TRAIN_EXTRA
    return out


@pytest.fixture(scope="module")
def journey(installed, tmp_path_factory, tests_data):
    home = tmp_path_factory.mktemp("home")
    user = User(installed, home)
    exports = user.cwd / "exports"
    scene_ids = write_export_like_scenes(exports)
    before = set(os.listdir(user.cwd))
    outputs = {}
    for argv in readme_journey():
        outputs[argv[1]] = user(_adapt(argv, "exports", scene_ids[0]))
    return {"user": user, "outputs": outputs, "scenes": scene_ids, "before": before}


def test_the_readme_names_the_whole_journey():
    steps = [argv[1] for argv in readme_journey()]
    assert steps == ["ingest", "train", "evaluate", "predict"]


def test_the_readme_journey_from_exports_to_a_predicted_cog(journey):
    user, out = journey["user"], journey["outputs"]
    # ingest: a dry run over every scene, the quirks named, nothing written.
    assert all(scene in out["ingest"].stdout + out["ingest"].stderr for scene in journey["scenes"])
    # train: the dataset built on first use from the exports, with its paths said.
    log = out["train"].stderr
    assert re.search(r"dataset rs_multisource/manual_t64 .* in " + re.escape(str(user.home)), log)
    assert "Compiled and ran the first step in" in log and "Next: rsjax evaluate" in log
    kept = dict(re.findall(r"(\w+) split: (\d+) tiles kept", log))
    assert set(kept) == {"train", "validation", "test"}
    config = json.loads((user.cwd / "runs" / "fusion" / "config.json").read_text())
    assert config["data"]["manual_dir"] == str(user.cwd / "exports")
    assert config["data"]["data_dir"] == str(user.home / "tensorflow_datasets")
    # evaluate: scores of the checkpoint.
    scores = json.loads(out["evaluate"].stdout)
    assert np.isfinite(scores["psnr"]) and 0 < scores["ssim"] <= 1
    # predict: a COG with reflectance as the products define it, and its STAC item.
    cog = user.cwd / f"{journey['scenes'][0]}_synthetic_s2.tif"
    with rasterio.open(cog) as ds:
        assert ds.count == 4 and ds.scales == (1e-4,) * 4 and ds.crs.to_epsg() != 4326
        reflectance = ds.read(masked=True).astype(np.float64) * ds.scales[0]
        assert 0 < float(reflectance.mean()) < 1
    assert Path(f"{cog}.stac.json").is_file()
    # Nothing in the current directory but what the commands named.
    assert set(os.listdir(user.cwd)) - journey["before"] == {"runs", cog.name, f"{cog.name}.stac.json"}


def test_a_saved_config_reruns_from_another_directory(journey):
    user = journey["user"]
    elsewhere = user.home / "elsewhere"
    elsewhere.mkdir()
    saved = user.cwd / "runs" / "fusion" / "config.json"
    relative = os.path.relpath(saved, elsewhere)
    done = subprocess.run([str(user.rsjax), "train", "--config", relative, "--workdir", "again",
                           "--config.total_steps=7", "--show_config"], cwd=elsewhere, env=user.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "total_steps: 7" in done.stdout and str(user.cwd / "exports") in done.stdout
    assert not (elsewhere / "again").exists()


def test_a_dataset_of_other_files_or_another_tile_size_is_never_taken(journey):
    user = journey["user"]
    fewer = user.cwd / "fewer"
    fewer.mkdir()
    for path in (user.cwd / "exports").glob(f"{journey['scenes'][0]}_*.tif"):
        shutil.copy(path, fewer / path.name)
    train = ["rsjax", "train", "--config", "fusion:manual,demo", "--workdir", "runs/other",
             "--config.data.tile_size=64"]
    err = user([*train, f"--config.data.manual_dir={fewer}"], expect=2).stderr
    assert "was built from other files" in err and "--overwrite" in err
    # No folder given and no dataset of that tile size: the one built is named.
    err = user(["rsjax", "train", "--config", "fusion:manual,demo", "--workdir", "runs/other"],
               expect=2).stderr
    assert "--config.data.manual_dir=DIR" in err and "manual_t64 (tile_size 64" in err
    assert not (user.cwd / "runs" / "other").exists()
    # The same files copied elsewhere are the same dataset: found, not rebuilt.
    copied = user.home / "copied"
    shutil.copytree(user.cwd / "exports", copied)
    done = user(["rsjax", "build", "--dataset", "manual", "--manual_dir", str(copied),
                 "--tile_size", "64"])
    assert json.loads(done.stdout)["built"] is False


def test_the_real_sample_through_ingest_and_predict(journey, tests_data):
    user = journey["user"]
    folder = user.home / "belgium"
    scene = belgium_as_exports(tests_data, folder)
    assert scene in user(["rsjax", "ingest", str(folder), "--tile_size", "64"]).stdout
    out = user.home / "belgium_synthetic_s2.tif"
    user(["rsjax", "predict", "--workdir", str(user.cwd / "runs" / "fusion"),
          "--s1", str(folder / "belgium_s1.tif"), "--lulc", str(folder / "belgium_lulc.tif"),
          "--dem", str(folder / "belgium_dem.tif"), "--out", str(out)])
    with rasterio.open(out) as ds, rasterio.open(folder / "belgium_s2.tif") as real:
        assert ds.crs == real.crs and ds.transform == real.transform and ds.shape == real.shape
        assert ds.tags().get("LAYOUT", ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT")) == "COG"
