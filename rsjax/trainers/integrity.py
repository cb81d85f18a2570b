"""Checkpoints that can be trusted: a checksum of every file of a saved step, verified on restore.

Once Orbax has finished a step, `write_manifest` records each file's size and
SHA-256 in `<step>/rsjax_checksums.json`, and `verify` checks them before the
step is restored. A step that fails, or that Orbax cannot read, is corrupt:
restore falls back to the newest intact step (`checkpoints.Checkpointer.restore`)
and training moves corrupt steps aside (`quarantine`); one that is intact but
does not fit the state is an error, nothing moved (`mismatch`, `is_damage`).
`unsafe_to_save` says why a state must not become a checkpoint. On gs:// no
manifest is written (its objects carry their own CRC32C).
docs/training.md ("Checkpoints") says why, and what each case does.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from typing import Optional

from etils import epath

log = logging.getLogger("rsjax")

MANIFEST = "rsjax_checksums.json"
QUARANTINE = "corrupt_checkpoints"
_CHUNK = 8 * 2**20


def _is_remote(path) -> bool:
    return "://" in os.fspath(path)


def _files(step_dir: epath.Path) -> list[epath.Path]:
    """Every file below a step folder except the manifest, in a stable order."""
    out = []
    for root, _, names in os.walk(os.fspath(step_dir)):
        for name in names:
            if name != MANIFEST and not name.startswith(f".{MANIFEST}"):
                out.append(epath.Path(root) / name)
    return sorted(out)


def sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(step_dir: str | os.PathLike) -> Optional[epath.Path]:
    """Records size and SHA-256 of every file of a finished step; returns the manifest's path.

    Written through a temporary name and renamed, so a manifest is whole or
    absent. Does nothing on object storage (see the module docstring) or when
    the step is gone (Orbax's max_to_keep may remove it first).
    """
    step_dir = epath.Path(os.fspath(step_dir))
    if _is_remote(step_dir) or not step_dir.is_dir():
        return None
    started = time.perf_counter()
    try:
        entries = {os.path.relpath(os.fspath(f), os.fspath(step_dir)): {"bytes": os.path.getsize(os.fspath(f)),
                                                                         "sha256": sha256(f)}
                   for f in _files(step_dir)}
    except FileNotFoundError:            # removed while hashing (max_to_keep)
        return None
    manifest = step_dir / MANIFEST
    tmp = step_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": entries}, indent=1, sort_keys=True))
    os.replace(os.fspath(tmp), os.fspath(manifest))
    log.debug("Checksums of %s: %d files in %.2f s", step_dir, len(entries), time.perf_counter() - started)
    return manifest


def has_manifest(step_dir: str | os.PathLike) -> bool:
    return (epath.Path(os.fspath(step_dir)) / MANIFEST).exists()


def is_verified(step_dir: str | os.PathLike) -> bool:
    """Whether a step's bytes can be vouched for: checksums recorded, or object storage's own."""
    return _is_remote(step_dir) or has_manifest(step_dir)


def verify(step_dir: str | os.PathLike) -> Optional[str]:
    """None when the step's files match its manifest (or it has none); else what is wrong."""
    step_dir = epath.Path(os.fspath(step_dir))
    manifest = step_dir / MANIFEST
    if _is_remote(step_dir) or not manifest.exists():
        return None
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return f"its checksum list {manifest.name} is unreadable ({err})"
    for name, expected in sorted(entries.items()):
        path = step_dir / name
        if not path.exists():
            return f"{name} is missing"
        size = os.path.getsize(os.fspath(path))
        if size != expected["bytes"]:
            return f"{name} has {size} bytes where {expected['bytes']} were written (truncated or overwritten)"
        if sha256(path) != expected["sha256"]:
            return f"{name} does not match the checksum recorded when it was written (its bytes changed)"
    return None


def quarantine(step_dir: str | os.PathLike, workdir: str | os.PathLike) -> Optional[epath.Path]:
    """Moves a corrupt step out of Orbax's folder into <workdir>/corrupt_checkpoints/; returns where.

    Nothing is deleted: the files stay for inspection. Returns None where the
    move is impossible (object storage, a read-only disk); the step then stays.
    """
    step_dir = epath.Path(os.fspath(step_dir))
    if _is_remote(step_dir):
        return None
    target_root = epath.Path(os.fspath(workdir)) / QUARANTINE
    target = target_root / step_dir.name
    n = 1
    while target.exists():
        n += 1
        target = target_root / f"{step_dir.name}.{n}"
    try:
        target_root.mkdir(parents=True, exist_ok=True)
        os.replace(os.fspath(step_dir), os.fspath(target))
    except OSError as err:
        log.warning("Could not move the corrupt checkpoint %s aside (%s).", step_dir, err)
        return None
    return target


# -- what may be saved --------------------------------------------------------------------------

# A model weight (or EMA, BatchNorm statistic) this large means the run diverged: trained weights
# are O(1), and a step at a learning rate of 1e30 leaves them near 1e30 while still finite.
PARAMETER_LIMIT = 1e8


def _is_optimizer_path(path) -> bool:
    """Optimizer states (Adam's moments grow with the squared gradients) are left out of the limit."""
    import jax

    return any(isinstance(k, jax.tree_util.DictKey) and str(k.key).endswith("opt") for k in path)


# Leaves are checked in groups of up to this many values, concatenated: one reduction
# per group instead of two per leaf (the tiny RS-SPADE state has 748 leaves; its check
# compiled in 3.4 s that way, in 0.3 s grouped), and a bounded temporary (64 MiB).
CHECK_GROUP_VALUES = 1 << 24


@functools.cache
def _jitted_largest_magnitudes():
    """One compiled program for the whole state (the first save of a run compiles
    it once): max |x| of each group of leaves. A max propagates NaN and inf, so
    it also says whether every value is finite."""
    import jax
    import jax.numpy as jnp

    def largest(groups):
        return jnp.stack([jnp.max(jnp.abs(jnp.concatenate([x.astype(jnp.float32).ravel() for x in group])))
                          for group in groups])
    return jax.jit(largest)


def _groups(leaves) -> list[list]:
    """Consecutive leaves in groups of up to CHECK_GROUP_VALUES values (a larger leaf alone)."""
    groups, current, size = [], [], 0
    for x in leaves:
        if current and size + x.size > CHECK_GROUP_VALUES:
            groups.append(current)
            current, size = [], 0
        current.append(x)
        size += x.size
    return groups + ([current] if current else [])


def _finite_and_largest(floats, weights):
    """(every value of `floats` finite, max |w| over `weights`); `weights` are among `floats`."""
    import numpy as np

    weight_ids = {id(w) for w in weights}
    others = [x for x in floats if id(x) not in weight_ids]
    weight_groups, other_groups = _groups(weights), _groups(others)
    magnitudes = np.asarray(_jitted_largest_magnitudes()(weight_groups + other_groups))
    largest = float(magnitudes[:len(weight_groups)].max()) if weight_groups else 0.0
    return bool(np.isfinite(magnitudes).all()), largest


def unsafe_to_save(state) -> Optional[str]:
    """Why a train state must not become a checkpoint, or None when it may.

    Refused: the last step was skipped as non-finite (`state["nonfinite"]` > 0:
    the run is in trouble, and resuming here would repeat it), any non-finite
    value, or a weight beyond PARAMETER_LIMIT (diverged but finite). One pass
    on the device, one number back to the host.
    """
    import jax
    import jax.numpy as jnp

    if isinstance(state, dict) and "nonfinite" in state and int(jax.device_get(state["nonfinite"])) > 0:
        return (f"its last {int(jax.device_get(state['nonfinite']))} step(s) were skipped as non-finite")
    floats = [(path, x) for path, x in jax.tree_util.tree_leaves_with_path(state)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not floats:
        return None
    weights = [x for path, x in floats if not _is_optimizer_path(path)]
    finite, largest = _finite_and_largest([x for _, x in floats], weights)
    if not finite:
        return "it holds non-finite values"
    if largest > PARAMETER_LIMIT:
        return f"its weights reach {float(largest):.3g} (beyond {PARAMETER_LIMIT:.0e}: the run diverged)"
    return None


# -- what counts as a corrupt step ----------------------------------------------------------------

# Words in the errors Orbax, tensorstore and json raise for damaged files. Only a step without
# checksums (object storage, a step from before them) is judged by them (`is_damage`).
_DAMAGE = ("DATA_LOSS", "OUT_OF_RANGE", "Error reading", "Error decoding", "Error opening",
           "Expecting", "Unterminated", "Extra data", "truncated", "corrupt", "No such file",
           "NOT_FOUND")


def is_damage(err: BaseException, step_dir: str | os.PathLike) -> bool:
    """Whether restoring `step_dir` failed because its files are damaged or missing, rather
    than because the checkpoint is intact but of another config (model, widths, sources),
    which must be an error: never moved aside, nor skipped for an older step.

    Files that match their checksums are intact, whatever the error's words (a NOT_FOUND or
    "No such file" from a checkpoint of another layout, a path with "corrupt" in it). Only a
    step without checksums is judged by the words (and the cause chain)."""
    if has_manifest(step_dir):
        return verify(step_dir) is not None
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError, EOFError, FileNotFoundError)):
            return True
        if any(word in str(err) for word in _DAMAGE):
            return True
        err = err.__cause__ or err.__context__
    return False


def _shapes(tree) -> dict[str, tuple]:
    """{'g/convs/0/kernel': shape} of every leaf of a saved tree's metadata or of a tree of
    ShapeDtypeStructs; a PRNG key by the shape of its key data (what Orbax saves)."""
    import jax

    def name(key) -> str:
        for attr in ("key", "idx", "name"):        # DictKey, SequenceKey, GetAttrKey
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    def shape(leaf) -> tuple:
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        return tuple(getattr(leaf, "shape", None) or ())
    return {"/".join(name(k) for k in path): shape(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def mismatch(state_dir: str | os.PathLike, abstract_state, show: int = 3) -> Optional[str]:
    """How a saved state's arrays differ from `abstract_state`'s (names, shapes): what a
    checkpoint of another config looks like, said in a line. None when they agree, or when
    the saved metadata cannot be read (damage, for `is_damage` to judge)."""
    import orbax.checkpoint as ocp

    reader = ocp.StandardCheckpointHandler()
    try:
        saved = _shapes(reader.metadata(epath.Path(os.fspath(state_dir))).tree)
    except Exception:  # pylint: disable=broad-except
        return None
    finally:
        reader.close()
    here = _shapes(abstract_state)
    parts = []
    for what, names in (
            ("of other shapes", [f"{k} saved {saved[k]}, here {here[k]}"
                                 for k in sorted(saved.keys() & here.keys()) if saved[k] != here[k]]),
            ("only in the checkpoint", sorted(saved.keys() - here.keys())),
            ("only in this config's state", sorted(here.keys() - saved.keys()))):
        if names:
            parts.append(f"{len(names)} arrays {what} ({'; '.join(names[:show])}"
                         + (", ..." if len(names) > show else "") + ")")
    return ", ".join(parts) or None


def short_error(err: BaseException, limit: int = 300) -> str:
    """What is wrong with the files, in one short line (tensorstore's errors carry kilobytes
    of spec; a JSON error says which JSON file is damaged, in words)."""
    cause = err
    while cause is not None and not isinstance(cause, json.JSONDecodeError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, json.JSONDecodeError):
        return (f"a JSON metadata file in it is cut short or garbled ({cause.msg} at character "
                f"{cause.pos} of {len(cause.doc)})")
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " ..."
