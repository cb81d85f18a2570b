"""PNG figures: image grids (true colour, NIR-R-G false colour, land-cover maps
in the Dynamic World palette) and metric curves (the paper's Figure 8).

`image_grid` (`render_grid` for the array) composes a grid pixel-exactly with
PIL: each tile pixel becomes a `scale` x `scale` block, no interpolation, so
what is drawn is what the model produced. `plot_curves` draws on matplotlib's
Agg canvas without pyplot's global state (safe in any thread, no display).
docs/training.md ("Figures") gives the grid's layout in output pixels.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rsjax.data.contract import LULC_CLASSES, LULC_PALETTE

GAP = 4
MIN_ROW_HEIGHT = 30              # room for a two-line row title beside tiny tiles
COLUMN_TITLE_HEIGHT = 18         # one line of text above each column, when asked for
MIN_CELL = 192                   # default upsampling target: small tiles stay readable
# Band positions in the stored s2 order (B2, B3, B4, B8 = blue, green, red, NIR).
RGB_BANDS = (2, 1, 0)            # B4, B3, B2: true colour
FALSE_COLOR_BANDS = (3, 2, 1)    # B8, B4, B3: NIR-R-G, vegetation shows red
ROW_KINDS = ("optical", "rgb", "false_color", "labels", "gray", "cloud_mask")
# Cloud/shadow mask codes (rsjax.data.contract) -> colour: clear dark, cloud
# white, shadow blue, unknown magenta.
CLOUD_MASK_COLOURS = {0: (40, 40, 40), 1: (255, 255, 255), 2: (70, 110, 220), 255: (200, 0, 200)}
_LEGEND_ENTRY_WIDTH = 140
_LEGEND_LINE_HEIGHT = 18
_SWATCH = 12


def palette_rgb() -> np.ndarray:
    """(256, 3) uint8 lookup: Dynamic World colour per label, black for 255 and
    anything else outside 0..8."""
    table = np.zeros((256, 3), np.uint8)
    for label, colour in enumerate(LULC_PALETTE):
        table[label] = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return table


def colorize_labels(labels) -> np.ndarray:
    """(..., H, W) class labels -> (..., H, W, 3) uint8 in the Dynamic World palette."""
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels < len(LULC_PALETTE))
    return palette_rgb()[np.where(valid, labels, 255).astype(np.uint8)]


def percentile_bounds(images, percentiles: Sequence[float] = (2.0, 98.0)):
    """(low, span) per channel of (N, H, W, C) images: their low percentile and
    the distance to the high one (inf for a constant or empty channel)."""
    images = np.asarray(images, np.float64)
    flat = np.where(np.isfinite(images), images, np.nan).reshape(-1, images.shape[-1])
    if np.all(np.isnan(flat)):
        return np.zeros(images.shape[-1]), np.full(images.shape[-1], np.inf)
    with np.errstate(all="ignore"):
        low, high = np.nanpercentile(flat, percentiles, axis=0)
    low = np.where(np.isnan(low), 0.0, low)
    return low, np.where(np.isnan(high) | (high <= low), np.inf, high - low)


def percentile_stretch(images, percentiles: Sequence[float] = (2.0, 98.0), bounds=None) -> np.ndarray:
    """Maps each channel of (N, H, W, C) images to [0, 1] between its low and
    high percentiles over all N images (NaN ignored, then shown black), the
    usual robust display stretch for reflectance. A constant channel maps to 0.
    `bounds` (low, span) from `percentile_bounds` of other images stretches
    these as those."""
    images = np.asarray(images, np.float64)
    finite = np.where(np.isfinite(images), images, np.nan)
    low, span = percentile_bounds(images, percentiles) if bounds is None else bounds
    out = np.clip((finite - low) / span, 0.0, 1.0)
    return np.where(np.isnan(out), 0.0, out)


def colorize_cloud_mask(mask) -> np.ndarray:
    """(..., H, W) cloud/shadow mask codes -> (..., H, W, 3) uint8 (CLOUD_MASK_COLOURS)."""
    table = np.zeros((256, 3), np.uint8)
    for code, colour in CLOUD_MASK_COLOURS.items():
        table[code] = colour
    return table[np.clip(np.asarray(mask), 0, 255).astype(np.uint8)]


def _guess_kind(images: np.ndarray) -> str:
    if np.issubdtype(images.dtype, np.integer) or images.ndim == 3:
        return "labels"
    if images.shape[-1] == 4:
        return "optical"
    return "gray"


def _as_labels(images: np.ndarray) -> np.ndarray:
    """(B, H, W) ints, (B, H, W, 1) ints, or (B, H, W, K) scores/one-hot -> (B, H, W)."""
    if images.ndim == 4:
        images = images[..., 0] if images.shape[-1] == 1 else np.argmax(images, axis=-1)
    return images


def auto_scale(tile_h: int, tile_w: int, min_cell: int = MIN_CELL) -> int:
    """The smallest integer factor that makes a (tile_h, tile_w) tile at least
    `min_cell` pixels on its longer side (1 for tiles that are already)."""
    return max(1, -(-min_cell // max(tile_h, tile_w)))


def _title(name: str, shown: str) -> list[str]:
    """Title lines of a display row: the row's name, then what is shown unless
    the name already says it ("land cover" needs no second "land cover")."""
    return [name] if shown.lower() in name.lower() else [name, shown]


def _display_rows(rows: Mapping[str, np.ndarray], kinds: Mapping[str, str], columns: int,
                  stretch_rows: Optional[Sequence[str]] = None):
    """[(title lines, (columns, H, W, 3) uint8)] and whether any row is a land-cover map."""
    arrays, row_kinds = {}, {}
    for name, images in rows.items():
        images = np.asarray(images)
        if images.ndim not in (3, 4):
            raise ValueError(f"row '{name}': expected (B, H, W, C) images or (B, H, W) labels, "
                             f"got shape {images.shape}.")
        kind = kinds.get(name) or _guess_kind(images)
        if kind not in ROW_KINDS:
            raise ValueError(f"row '{name}': unknown kind '{kind}'; choose one of {', '.join(ROW_KINDS)}.")
        if kind in ("optical", "rgb", "false_color") and (images.ndim != 4 or images.shape[-1] < 4):
            raise ValueError(f"row '{name}': '{kind}' needs (B, H, W, 4) images in band order "
                             f"B2, B3, B4, B8, got shape {images.shape}.")
        arrays[name], row_kinds[name] = images[:columns], kind
    shapes = {a.shape[1:3] for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"all rows must share one tile size, got {sorted(shapes)}.")
    if len({len(a) for a in arrays.values()}) != 1:
        raise ValueError("all rows must have the same number of images: "
                         + ", ".join(f"{n}: {len(a)}" for n, a in arrays.items()))

    # Optical rows share one stretch per column, so a generated image and its
    # real counterpart are shown on the same scale and colour differences are real.
    # `stretch_rows` (optical rows) set the stretch alone, e.g. the clear truth,
    # so that bright clouds in another row do not darken the column.
    optical_names = [n for n in arrays if row_kinds[n] in ("optical", "rgb", "false_color")]
    reference = [n for n in (stretch_rows or optical_names) if n in optical_names] or optical_names
    stretched = {}
    if optical_names:
        stacked = np.stack([arrays[n][..., :4] for n in optical_names], axis=1)   # (columns, rows, H, W, 4)
        chosen = [optical_names.index(n) for n in reference]
        per_column = np.stack([percentile_stretch(column, bounds=percentile_bounds(column[chosen]))
                               for column in stacked])
        stretched = {n: per_column[:, i] for i, n in enumerate(optical_names)}

    def to_uint8(x):
        return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)

    display = []
    for name, images in arrays.items():
        kind = row_kinds[name]
        if kind in ("optical", "rgb"):
            display.append((_title(name, "RGB"), to_uint8(stretched[name][..., list(RGB_BANDS)])))
        if kind in ("optical", "false_color"):
            display.append((_title(name, "NIR-R-G"), to_uint8(stretched[name][..., list(FALSE_COLOR_BANDS)])))
        if kind == "labels":
            display.append((_title(name, "land cover"), colorize_labels(_as_labels(images))))
        if kind == "cloud_mask":
            display.append((_title(name, "cloud mask"), colorize_cloud_mask(_as_labels(images))))
        if kind == "gray":
            gray = np.stack([percentile_stretch(image[None, ..., :1])[0] for image in images])
            display.append(([name], to_uint8(np.repeat(gray, 3, axis=-1))))
    return display, "labels" in row_kinds.values()


def render_grid(rows: Mapping[str, np.ndarray], kinds: Optional[Mapping[str, str]] = None,
                max_columns: int = 8, scale: Optional[int] = None,
                label_width: int = 110,
                column_titles: Optional[Sequence[str]] = None,
                stretch_rows: Optional[Sequence[str]] = None) -> np.ndarray:
    """The grid of `image_grid` as an (H, W, 3) uint8 array (e.g. for TensorBoard)."""
    if not rows:
        raise ValueError("image_grid needs at least one row.")
    if scale is not None and (int(scale) != scale or scale < 1):
        raise ValueError(f"scale must be a positive integer, got {scale}.")
    display, with_legend = _display_rows(rows, kinds or {}, max_columns, stretch_rows)
    columns, tile_h, tile_w = display[0][1].shape[:3]
    scale = auto_scale(tile_h, tile_w) if scale is None else int(scale)
    if column_titles is not None and len(column_titles) != columns:
        raise ValueError(f"{len(column_titles)} column titles for {columns} columns.")
    top = COLUMN_TITLE_HEIGHT if column_titles is not None else 0
    cell_h, cell_w = tile_h * scale, tile_w * scale
    width = label_width + GAP + columns * (cell_w + GAP)
    row_height = max(cell_h, MIN_ROW_HEIGHT)
    grid_h = top + GAP + len(display) * (row_height + GAP)
    palette = palette_rgb()
    legend = [(f"{i} {name}", palette[i]) for i, name in enumerate(LULC_CLASSES)]
    legend.append(("255 no data", palette[255]))
    per_line = max(1, (width - GAP) // _LEGEND_ENTRY_WIDTH)
    legend_lines = -(-len(legend) // per_line) if with_legend else 0
    height = grid_h + (legend_lines * _LEGEND_LINE_HEIGHT + GAP if with_legend else 0)

    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    for r, (title, tiles) in enumerate(display):
        y = top + GAP + r * (row_height + GAP)
        draw.multiline_text((GAP, y + 2), "\n".join(title), fill="black", font=font)
        for c, tile in enumerate(tiles):
            block = np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)
            canvas.paste(Image.fromarray(block), (label_width + GAP + c * (cell_w + GAP), y))
    for c, text in enumerate(column_titles or ()):
        draw.text((label_width + GAP + c * (cell_w + GAP), 3), str(text), fill="black", font=font)
    if with_legend:
        for i, (text, colour) in enumerate(legend):
            x = GAP + (i % per_line) * _LEGEND_ENTRY_WIDTH
            y = grid_h + (i // per_line) * _LEGEND_LINE_HEIGHT
            draw.rectangle([x, y + 2, x + _SWATCH, y + 2 + _SWATCH], fill=tuple(int(v) for v in colour),
                           outline="black")
            draw.text((x + _SWATCH + 4, y + 1), text, fill="black", font=font)
    return np.asarray(canvas)


def image_grid(rows: Mapping[str, np.ndarray], path: str | os.PathLike,
               kinds: Optional[Mapping[str, str]] = None, max_columns: int = 8,
               scale: Optional[int] = None, label_width: int = 110,
               column_titles: Optional[Sequence[str]] = None,
               stretch_rows: Optional[Sequence[str]] = None) -> Path:
    """Writes a PNG with one display row per entry of `rows` and one column per example.

    rows: {name: array}, drawn top to bottom in the mapping's order, e.g.
      {"real": real, "generated": fake, "land cover": labels}; every array
      has the same batch size and tile size; the first `max_columns`
      examples are drawn.
    kinds: {name: kind} where the guess is wrong. Kinds:
      "optical"     (B, H, W, 4) B2,B3,B4,B8 -> two rows, RGB (B4,B3,B2) and
                    NIR-R-G false colour (B8,B4,B3); default for 4-channel floats;
      "rgb", "false_color": just one of the two;
      "labels"      (B, H, W) ints (255 = no data, black), (B, H, W, 1) ints,
                    or (B, H, W, K) scores/one-hot (argmax); default for ints
                    and 3-D arrays; adds the Dynamic World legend;
      "gray"        first channel, stretched per image; default otherwise;
      "cloud_mask"  (B, H, W) codes 0 clear (dark), 1 cloud (white), 2 shadow
                    (blue), 255 unknown (magenta).
    Optical rows share a 2-98 % per-band stretch per column, so generated and
    real images of one example are on the same scale; `stretch_rows` names
    the rows that set it (default: every optical row), e.g. the clear truth
    in a cloud-removal grid, where clouds would otherwise darken the rest.
    scale: integer upsampling of every tile (nearest neighbour); default: the
      smallest that makes cells at least MIN_CELL pixels.
    column_titles: one line of text above each drawn column (e.g. a score).
    Returns the path.
    """
    return save_png(render_grid(rows, kinds, max_columns, scale, label_width, column_titles,
                                stretch_rows), path)


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Writes an (H, W, 3) uint8 array (e.g. from `render_grid`) as a PNG; returns the path."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
    return _write_bytes(path, buffer.getvalue())


def plot_curves(series: Mapping[str, tuple], path: str | os.PathLike, xlabel: str = "epoch",
                ylabel: str = "mIoU", title: str = "", figsize=(6.0, 4.0), dpi: int = 100) -> Path:
    """Line plot of {name: (x, y)} to a PNG of exactly figsize*dpi pixels, e.g.
    validation mIoU per epoch of 'real' against 'mix' (the paper's Figure 8)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not series:
        raise ValueError("plot_curves needs at least one series.")
    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, (x, y) in series.items():
        x, y = np.asarray(x, float), np.asarray(y, float)
        if x.shape != y.shape:
            raise ValueError(f"series '{name}': x has shape {x.shape}, y has {y.shape}.")
        axes.plot(x, y, marker="o", markersize=3, label=name)
    if all(np.all(np.asarray(x) == np.round(np.asarray(x, float))) for x, _ in series.values()):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))       # epochs, steps
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return save_figure(figure, path)


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Writes a matplotlib Figure as a PNG at its own size and dpi; returns the path."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=figure.dpi)
    return _write_bytes(path, buffer.getvalue())


def _write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes a file through etils.epath, so gs:// paths work as local ones do;
    returns a pathlib.Path for a local file, an epath.Path for a URI."""
    from etils import epath

    target = epath.Path(os.fspath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target if "://" in os.fspath(path) else Path(path)
