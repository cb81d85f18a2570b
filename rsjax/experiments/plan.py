"""What each scale of the experiments runs: a list of runs, in dependency order.

A run is one training (fusion or segmentation) or one synthesis of generated
images, with its config spec, overrides and seed. Names are paths under the
experiment's workdir (`table1/rs_spade/seed1`), so the runner finds finished
runs and resumes unfinished ones by name.

The questions (the paper's, made answerable):
- Table 1: RS-SPADE against pix2pix, all sources. The objective is an axis:
  RS-SPADE with its own objective (hinge + feature matching), and with
  pix2pix's L1 term added (x100, as pix2pix), beside pix2pix (vanilla GAN + L1
  x100). Same data, steps, batch and evaluation (no EMA) for all; no model was
  tuned (each keeps its reference hyper-parameters: the same, zero, tuning
  budget). So RS-SPADE+L1 against pix2pix is the method, RS-SPADE against
  RS-SPADE+L1 is the objective.
- Table 2: RS-SPADE (its own objective) on each source subset.
- Table 3: RS-UNet on real tiles only, and with generated images mixed in at
  0.5, 1 and 2 generated per real tile (a rate of 2 takes its second image
  from the generator of the next seed, for diversity); and "new layouts": the
  scenes of one half of the training split have no optical image (cloudy or
  missing), a generator trained on the other half makes theirs, and RS-UNet
  trains on the real half plus those, against the real half alone. Always
  evaluated on the real test tiles.

Each generator used for Table 3 is the Table 1 RS-SPADE run of the same seed
(the paper's objective), fixed before any result was seen.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

SCALES = ("demo", "bench", "paper")

# Seeds per scale (model initialisation and data order); Table 2 may use fewer.
SEEDS = {"demo": 1, "bench": 3, "paper": 3}
TABLE2_SEEDS = {"demo": 1, "bench": 2, "paper": 3}
MIX_RATES = (0.5, 1.0, 2.0)

# Table 1's models: name -> config arguments.
TABLE1 = {
    "pix2pix": "model=pix2pix",
    "rs_spade": "model=rs_spade,objective=spade",
    "rs_spade_l1": "model=rs_spade,objective=spade+l1",
}
# Table 2's source subsets (all three is Table 1's rs_spade).
TABLE2 = ("s1", "lulc", "lulc+s1", "lulc+dem", "s1+dem")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str                       # path under the experiment's workdir
    kind: str                       # "fusion", "segmentation", "synthesize" or "cloud_removal"
    config: str                     # config spec, e.g. "fusion:bench,model=pix2pix"
    overrides: tuple[str, ...] = ()  # "key=value" config overrides
    table: str = ""                 # "table1", "table2", "table3" or "cloud_removal"
    method: str = ""                # the row of its table
    seed: int = 0
    # synthesize: the fusion run whose generator is used, and what to generate for
    generator: Optional[str] = None
    scenes: str = "all"             # "all", "optical" or "no_optical" training scenes


def seed_overrides(seed: int) -> tuple[str, ...]:
    return (f"seed={seed}",)


def _fusion(scale: str, table: str, method: str, args: str, seed: int,
            scenes: str = "all") -> Run:
    extra = () if scenes == "all" else (f"data.train_scenes={scenes}",)
    return Run(name=f"{table}/{method}/seed{seed}", kind="fusion",
               config=f"fusion:{scale},{args}", overrides=seed_overrides(seed) + extra,
               table=table, method=method, seed=seed, scenes=scenes)


def _synthesize(gen: Run, scenes: str = "all") -> Run:
    suffix = "" if scenes == "all" else f"_{scenes}"
    return Run(name=f"generated/{gen.method}{suffix}/seed{gen.seed}", kind="synthesize",
               config=gen.config, overrides=gen.overrides, seed=gen.seed,
               generator=gen.name, scenes=scenes)


def _segmentation(scale: str, method: str, seed: int, overrides: tuple[str, ...] = (),
                  generated: tuple[str, ...] = ()) -> Run:
    return Run(name=f"table3/{method}/seed{seed}", kind="segmentation",
               config=f"segmentation:{scale}", overrides=seed_overrides(seed) + overrides,
               table="table3", method=method, seed=seed,
               generator=",".join(generated) or None)


def plan(scale: str, seeds: Optional[int] = None, tables: tuple[str, ...] = ("table1", "table2", "table3"),
         table2_seeds: Optional[int] = None) -> list[Run]:
    """Every run of a scale, each after the runs it needs."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: choose one of {', '.join(SCALES)}")
    n = SEEDS[scale] if seeds is None else seeds
    n2 = min(n, TABLE2_SEEDS[scale] if table2_seeds is None else table2_seeds)
    runs: list[Run] = []
    generators = {}
    if "table1" in tables or "table3" in tables:
        for seed in range(n):
            for method, args in TABLE1.items():
                if "table1" not in tables and method != "rs_spade":
                    continue
                run = _fusion(scale, "table1", method, args, seed)
                runs.append(run)
                if method == "rs_spade":
                    generators[seed] = run
    if "table2" in tables:
        for seed in range(n2):
            for subset in TABLE2:
                runs.append(_fusion(scale, "table2", subset.replace("+", "_"),
                                    f"model=rs_spade,objective=spade,sources={subset}", seed))
    if "table3" in tables:
        synth = {seed: _synthesize(generators[seed]) for seed in range(n)}
        runs += list(synth.values())
        for seed in range(n):
            runs.append(_segmentation(scale, "real", seed, ("data.train_data=real",)))
            for rate in MIX_RATES:
                # rate 2: the second generated image of each tile comes from
                # the next seed's generator (another model, not a copy).
                dirs = [synth[seed].name] + ([synth[(seed + 1) % n].name] if rate > 1 else [])
                runs.append(_segmentation(scale, f"mix_{rate:g}", seed,
                                          ("data.train_data=mix", f"data.mix_rate={rate}"),
                                          tuple(dirs)))
        # New layouts: a generator that never saw the optical half's images.
        for seed in range(n):
            gen = _fusion(scale, "table3", "generator_optical_half", TABLE1["rs_spade"], seed,
                          scenes="optical")
            runs.append(gen)
            synth_half = _synthesize(gen, scenes="no_optical")
            runs.append(synth_half)
            runs.append(_segmentation(scale, "real_optical_half", seed,
                                      ("data.train_data=real", "data.train_scenes=optical")))
            runs.append(_segmentation(scale, "new_layouts", seed,
                                      ("data.train_data=mix", "data.mix_all=True",
                                       "data.train_scenes=optical"),
                                      (synth_half.name,)))
    return runs
