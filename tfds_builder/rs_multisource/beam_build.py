"""The rs_multisource build on Apache Beam (used when the build is given a runner).

The pipeline, on the runner's workers:

1. scenes (listed by the driver) are spread over the workers; each is
   validated there and cut into strips of whole tile rows, about
   `tiles_per_element` tiles each, so that one big scene is ingested by many
   workers;
2. each strip is registered and tiled with ingestion's own code, and each
   tile placed in its split (`scene_examples`, the same function as the
   build without Beam: same tiles, same keys, same bytes);
3. the tiles of each split go to TFDS's writer, which shuffles them by key
   exactly as the single-process writer does;
4. one combiner (`SummaryCombineFn`) folds the train tiles into the mergeable
   statistics of `rsjax.data.statistics`, and the strips' ingestion counts
   into per-scene totals; its single output is written as JSON into the
   build's temporary folder, where the driver reads it into the dataset's
   metadata after the pipeline has finished.

TFDS writes everything into a temporary folder and renames it only when the
pipeline has succeeded, so a failed or interrupted build leaves nothing that
loads as a dataset. A bad scene fails the pipeline with the scene's
`InputError` message.
"""
from __future__ import annotations

import json
from typing import Callable, Sequence

import apache_beam as beam

from rsjax.data import ingest
from rsjax.data.contract import COVER_BINS, cover_bin, scene_from_record, scene_to_record
from rsjax.data import splits as splits_lib
from rsjax.data import statistics as statistics_lib


def split_pcollections(pipeline, scenes: Sequence, cfg, opts, *, scene_examples: Callable,
                       validate: Callable, tiles_per_element: int, summary_path: str,
                       statistics_seed: int = 0) -> dict:
    """{split: PCollection of (key, example)}; the summary JSON is written to `summary_path`."""
    units = (pipeline
             | "Scenes" >> beam.Create([scene_to_record(s) for s in scenes])
             | "SpreadScenes" >> beam.Reshuffle()
             | "PlanStrips" >> beam.FlatMap(plan_strips, opts=opts, validate=validate,
                                           tiles_per_element=tiles_per_element)
             | "SpreadStrips" >> beam.Reshuffle())
    ingested = units | "Ingest" >> beam.ParDo(
        IngestStrip(cfg, opts, scene_examples)).with_outputs(COUNTS_TAG, main="tiles")
    tiles = ingested.tiles
    by_split = tiles | "BySplit" >> beam.Partition(_split_index, len(splits_lib.SPLITS))
    out = {}
    for index, split in enumerate(splits_lib.SPLITS):
        out[split] = by_split[index] | f"Key_{split}" >> beam.Map(lambda t: (t[1], t[2]))
    summary_inputs = (
        (by_split[splits_lib.SPLITS.index("train")] | "TrainTiles" >> beam.Map(
            lambda t: ("train_tile", t[2])),
         tiles | "SplitOf" >> beam.Map(lambda t: ("split", t[0])),
         # Cloud removal datasets: each tile's cloud-cover bin, per split.
         tiles | "CoverOf" >> beam.FlatMap(
             lambda t: [("cover", (t[0], cover_bin(float(t[2]["cloud_cover"]))))]
             if "cloud_cover" in t[2] else []),
         ingested[COUNTS_TAG])
        | "SummaryInputs" >> beam.Flatten())
    _ = (summary_inputs
         | "Summary" >> beam.CombineGlobally(SummaryCombineFn(opts, statistics_seed))
         | "SummaryJson" >> beam.Map(json.dumps)
         | "WriteSummary" >> beam.io.WriteToText(summary_path, num_shards=1,
                                                 shard_name_template=""))
    return out


COUNTS_TAG = "counts"


def _split_index(element, num_partitions: int) -> int:
    return splits_lib.SPLITS.index(element[0])


def strips(height: int, tile_size: int, stride: int, tiles_per_row: int,
           tiles_per_element: int) -> list[range]:
    """Ranges of tile top rows (pixel offsets) that cut a scene into strips of whole tile rows.

    Together they hold every tile row of ingest.tile_windows exactly once.
    """
    tile_rows = list(range(0, height - tile_size + 1, stride))
    if not tile_rows:
        return []
    # At most tiles_per_element tiles, unless one row of tiles alone holds more.
    rows_per_strip = max(1, tiles_per_element // max(tiles_per_row, 1))
    out = []
    for i in range(0, len(tile_rows), rows_per_strip):
        chunk = tile_rows[i:i + rows_per_strip]
        out.append(range(chunk[0], chunk[-1] + 1))
    return out


def plan_strips(record, *, opts, validate: Callable, tiles_per_element: int):
    """(scene record, (row_start, row_stop)) elements of one scene; validates the scene
    first (a bad file fails the build with the scene's InputError)."""
    grid = validate(scene_from_record(record), opts)
    tiles_per_row = len(range(0, grid.width - opts.tile_size + 1, opts.step))
    planned = strips(grid.height, opts.tile_size, opts.step, tiles_per_row, tiles_per_element)
    # A scene too small for a tile still gets its line in the report, as without Beam.
    for rows in planned or [range(0)]:
        yield record, (rows.start, rows.stop)


class IngestStrip(beam.DoFn):
    """Tiles of one strip as (split, key, example), and the strip's ingestion counts (tagged)."""

    def __init__(self, cfg, opts, scene_examples: Callable):
        self.cfg, self.opts, self.scene_examples = cfg, opts, scene_examples

    def process(self, element):
        record, (start, stop) = element
        scene, rows = scene_from_record(record), range(start, stop)
        report = ingest.IngestReport()
        straddling = 0
        for split, key, example in self.scene_examples(scene, self.cfg, self.opts, report, rows):
            if split is None:
                straddling += 1
                continue
            yield split, key, example
        counts = report.to_dict()["scenes"]
        yield beam.pvalue.TaggedOutput(COUNTS_TAG, ("scene_counts", (counts, straddling)))


class SummaryCombineFn(beam.CombineFn):
    """Train statistics, split counts and per-scene ingestion counts, in one accumulator."""

    def __init__(self, opts, seed: int = 0):
        self.opts, self.seed = opts, seed

    def create_accumulator(self):
        return {"statistics": statistics_lib.DatasetStatistics(seed=self.seed),
                "splits": {}, "scenes": {}, "straddling": 0, "covers": {}}

    def add_input(self, acc, element):
        kind, value = element
        if kind == "train_tile":
            acc["statistics"].update(value)
        elif kind == "split":
            acc["splits"][value] = acc["splits"].get(value, 0) + 1
        elif kind == "cover":
            split, index = value
            counts = acc["covers"].setdefault(split, [0] * (len(COVER_BINS) + 1))
            counts[index] += 1                       # index -1: unknown cover
        elif kind == "scene_counts":
            counts, straddling = value
            _add_scene_counts(acc["scenes"], counts)
            acc["straddling"] += straddling
        else:
            raise ValueError(f"unknown summary input {kind!r}")
        return acc

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        total = accumulators[0]
        for acc in accumulators[1:]:
            total["statistics"].merge(acc["statistics"])
            for split, n in acc["splits"].items():
                total["splits"][split] = total["splits"].get(split, 0) + n
            _add_scene_counts(total["scenes"], acc["scenes"])
            total["straddling"] += acc["straddling"]
            for split, counts in acc["covers"].items():
                mine = total["covers"].setdefault(split, [0] * len(counts))
                total["covers"][split] = [a + b for a, b in zip(mine, counts)]
        return total

    def extract_output(self, acc):
        scenes = dict(sorted(acc["scenes"].items()))
        for scene_id, c in scenes.items():
            # Strips leave this to the whole scene: why a scene yields no tile at all.
            if c["tiles_kept"] == 0:
                counts = ingest.SceneCounts(**{k: v for k, v in c.items() if k != "tiles_total"})
                c["warning"] = ingest.no_tile_reason(scene_id, c["width"], c["height"], self.opts,
                                                     counts)
        return {
            "statistics": acc["statistics"].result(),
            "split_counts": {s: acc["splits"].get(s, 0) for s in splits_lib.SPLITS},
            "dropped_straddling_tiles": acc["straddling"],
            # Per scene, as in ingest.IngestReport.to_dict(): the driver rebuilds the report.
            "ingest": {"scenes": scenes},
            # Tiles per cloud-cover bin (then unknown) per split, for datasets with clouds.
            "tiles_by_cover": acc["covers"],
        }


_SUMMED = ("tiles_kept", "tiles_dropped_nodata", "tiles_total")


def _add_scene_counts(total: dict, counts: dict) -> None:
    """Adds per-scene counts (IngestReport.to_dict()['scenes'] layout) of strips into `total`."""
    for scene_id, c in counts.items():
        if scene_id not in total:
            total[scene_id] = dict(c)
        else:
            for key in _SUMMED:
                total[scene_id][key] += c[key]
            if c.get("tiles_by_cover"):             # cloud removal: counts per cover bin
                mine = total[scene_id].get("tiles_by_cover") or [0] * len(c["tiles_by_cover"])
                total[scene_id]["tiles_by_cover"] = [a + b for a, b in zip(mine, c["tiles_by_cover"])]
