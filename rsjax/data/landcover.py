"""Land-cover legends: Dynamic World labels, other legends mapped onto them.

The contract stores Dynamic World labels (0 water ... 8 snow_and_ice; 255 no
data). A file whose values lie outside 0..8, or that holds exactly 0 and 1 (a
binary map, which would read as water and trees), is an error
(`not_dynamic_world`) unless `lulc_legend="dynamic_world"` takes it as it is or
`lulc_map` (`"1:4,0:255"` or `{"1": 4, "0": 255}`, `parse_lulc_map`) maps
every value it holds onto labels (`apply_lulc_map`).
docs/data.md (section 'Ingestion: GeoTIFFs to registered tiles', item 'Land
cover') gives the rules.
"""
from __future__ import annotations

import json
from typing import Iterable, Mapping, Optional

import numpy as np

from rsjax.data.contract import LULC_CLASSES, LULC_NODATA, NUM_CLASSES

LEGENDS = ("auto", "dynamic_world")
LulcMap = tuple[tuple[int, int], ...]


def parse_lulc_map(value) -> Optional[LulcMap]:
    """A legend mapping as sorted (file value, label) pairs, from "1:4,0:255", JSON or a mapping.

    None and "" give None. Raises ValueError naming `lulc_map` for anything else.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                pairs = list(json.loads(text).items())
            except (json.JSONDecodeError, AttributeError) as err:
                raise ValueError(f"lulc_map {value!r}: not a JSON object ({err}). Write it as "
                                 "'1:4,0:255' or '{\"1\": 4, \"0\": 255}'.") from None
        else:
            pairs = [item.split(":", 1) for item in text.split(",") if item.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(f"lulc_map {value!r}: write 'file value:label' pairs separated by "
                                 "commas, e.g. '1:4,0:255'.")
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        pairs = list(value)
    out = {}
    for src, dst in pairs:
        try:
            src_f, dst_i = float(str(src).strip()), int(str(dst).strip())
        except ValueError:
            raise ValueError(f"lulc_map {value!r}: {src!r}:{dst!r} is not a pair of whole numbers.") from None
        if src_f != int(src_f):
            raise ValueError(f"lulc_map {value!r}: file value {src!r} is not a whole number.")
        if not (0 <= dst_i < NUM_CLASSES or dst_i == LULC_NODATA):
            raise ValueError(f"lulc_map {value!r}: label {dst_i} for file value {src!r} is not a Dynamic "
                             f"World label 0..{NUM_CLASSES - 1} ({', '.join(LULC_CLASSES)}) or "
                             f"{LULC_NODATA} (no data).")
        if int(src_f) in out and out[int(src_f)] != dst_i:
            raise ValueError(f"lulc_map {value!r}: file value {int(src_f)} is mapped twice.")
        out[int(src_f)] = dst_i
    if not out:
        raise ValueError(f"lulc_map {value!r}: maps no value.")
    return tuple(sorted(out.items()))


def format_lulc_map(pairs: Optional[LulcMap]) -> str:
    """The canonical "0:255,1:4" spelling of a mapping ('' for none)."""
    return ",".join(f"{a}:{b}" for a, b in pairs) if pairs else ""


def not_dynamic_world(values: Iterable[float]) -> Optional[str]:
    """Why a file holding `values` (its valid, whole values) cannot be Dynamic World; None if it can."""
    # Only 0 or only 1 is a plausible Dynamic World scene (all water, all trees); both and
    # nothing else is the signature of a binary mask.
    if {int(v) for v in values} == {0, 1}:
        return ("holds only the values 0 and 1: a binary map (e.g. crop / no crop, water / land), "
                "not a Dynamic World label composite, in which 0 is water and 1 is trees")
    return None


def apply_lulc_map(labels: np.ndarray, pairs: LulcMap) -> np.ndarray:
    """Maps whole-numbered file values (float array, NaN or 255 = no data) to uint8 Dynamic World labels.

    Values without a mapping (validation refuses files that have any) become no data.
    """
    out = np.full(labels.shape, LULC_NODATA, dtype=np.uint8)
    valid = np.isfinite(labels) & (labels != LULC_NODATA)
    for src, dst in pairs:
        out[valid & (labels == src)] = dst
    return out
