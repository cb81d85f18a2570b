"""Tiny configs and a shared demo dataset for the trainer tests."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def host_numpy(tree):
    """Host copies, PRNG keys (dropout streams) as their raw key data."""
    def one(x):
        if jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)


def load_config(name: str, arg: str = "demo"):
    """A shipped config by name (as `--config name:arg`), unlocked for the tests to shrink."""
    from rsjax.config_loader import load_config as load

    return load(f"{name}:{arg}" if arg else name, lock=False)


# The fusion models at the smallest widths that still exercise every layer.
TINY_MODELS = {
    "pix2pix": {"generator.ngf": 4, "discriminator.ndf": 4},
    "rs_spade": {"generator.ngf": 4, "discriminator.ndf": 4, "generator.embed_dim": 4,
                 "generator.spade_hidden": 8},
    "flow": {"generator.ngf": 4, "generator.channel_mults": (1, 2), "generator.embed_dim": 4,
             "generator.hidden": 8, "generator.time_dim": 16, "generator.groups": 2,
             "flow.sample_steps": 2},
}


def tiny_fusion_config(data_dir, model: str = "pix2pix", steps: int = 4, sources: str = "all"):
    """The demo config shrunk so a run compiles and trains in seconds."""
    c = load_config("fusion", f"demo,model={model},sources={sources}")
    tiny = {"data.data_dir": str(data_dir), "data.augment": True, "total_steps": steps,
            "global_batch_size": 8, "eval_batch_size": 8, "log_every_steps": 2,
            "image_every_steps": 0, "eval_every_steps": 0, "checkpoint_every_steps": 2,
            "optim.decay_start_step": None, **TINY_MODELS[model]}
    c.update_from_flattened_dict(tiny)
    return c


# The cloud_removal trainer's models, shrunk likewise.
TINY_CLOUD_MODELS = {
    "dsen2cr": {"model.features": 8, "model.num_blocks": 1},
    "uncrtaints": {"model.width": 8, "model.decoder_blocks": 1},
}


def tiny_cloud_config(data_dir, name: str = "cloud_removal", sources: str = "s2_cloudy+s1",
                      steps: int = 2, extra: str = "", model: str = ""):
    """A run on the small cloudy dataset (conftest.CLOUDY_DATA), shrunk to train
    in seconds: `cloud_removal` (`model`: DSen2-CR by default, or uncrtaints) or
    `fusion` (`model`: RS-SPADE by default); `extra`: more config arguments
    (e.g. "clouds")."""
    from conftest import CLOUDY_DATA

    model = model or ("rs_spade" if name == "fusion" else "dsen2cr")
    c = load_config(name, ",".join(["demo", f"model={model}", f"sources={sources}",
                                    *filter(None, [extra])]))
    c.update_from_flattened_dict((TINY_MODELS if name == "fusion" else TINY_CLOUD_MODELS)[model])
    c.data.update(CLOUDY_DATA)
    c.update_from_flattened_dict(
        {"data.data_dir": str(data_dir), "total_steps": steps, "global_batch_size": 8,
         "eval_batch_size": 8, "log_every_steps": 1, "image_every_steps": steps,
         "eval_every_steps": 0, "checkpoint_every_steps": steps, "optim.decay_start_step": None})
    return c


def convolution_dtypes(jaxpr, primitives=("conv_general_dilated",)) -> list[tuple]:
    """Operand dtypes of every convolution (or other `primitives`) in `jaxpr`,
    nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in primitives:
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)        # ClosedJaxpr or Jaxpr
                if hasattr(inner, "eqns"):
                    found += convolution_dtypes(inner, primitives)
    return found


# -- damaging a checkpoint on purpose (tests of the integrity checks) -----------------------------
def overwrite_middle(path, n=64):
    """Changes n bytes in the middle of a file, keeping its size."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes((b + 1) % 256 for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def largest_data_file(workdir, step):
    """The largest of a checkpoint step's OCDBT data files (where the weights are)."""
    files = (Path(workdir) / "checkpoints" / str(step) / "state").rglob("*")
    return max((f for f in files if f.is_file() and f.parent.name == "d"), key=lambda f: f.stat().st_size)
