"""PNG figures: files, sizes, and that each band lands in the right colour channel."""
import numpy as np
import pytest
from PIL import Image

from rsjax import viz
from rsjax.data.contract import LULC_PALETTE

H = W = 6
LABEL_WIDTH = 110


def _cell_pixel(grid, row, column, scale=1, y=0, x=0):
    """Pixel (y, x) of a tile at display row/column, per the layout in viz's docstring."""
    top = viz.GAP + row * (max(H * scale, viz.MIN_ROW_HEIGHT) + viz.GAP)
    left = LABEL_WIDTH + viz.GAP + column * (W * scale + viz.GAP)
    return tuple(int(v) for v in grid[top + y, left + x])


def _red_and_nir_image():
    """Left half: only red (B4) reflects; right half: only NIR (B8) reflects."""
    image = np.zeros((1, H, W, 4), np.float32)
    image[0, :, : W // 2, 2] = 0.3
    image[0, :, W // 2:, 3] = 0.4
    return image


def test_rgb_and_false_colour_channel_order(tmp_path):
    path = viz.image_grid({"real": _red_and_nir_image()}, tmp_path / "grid.png", scale=2)
    grid = np.asarray(Image.open(path).convert("RGB"))
    # True colour (B4, B3, B2): red pixels red, NIR-only pixels black.
    assert _cell_pixel(grid, 0, 0, scale=2, x=0) == (255, 0, 0)
    assert _cell_pixel(grid, 0, 0, scale=2, x=2 * W - 1) == (0, 0, 0)
    # False colour (B8, B4, B3): NIR shows red, red shows green.
    assert _cell_pixel(grid, 1, 0, scale=2, x=0) == (0, 255, 0)
    assert _cell_pixel(grid, 1, 0, scale=2, x=2 * W - 1) == (255, 0, 0)


def test_grid_png_size_and_shared_stretch_per_column(tmp_path):
    rng = np.random.default_rng(0)
    real = rng.uniform(0.0, 0.3, (3, H, W, 4)).astype(np.float32)
    rows = {"s1 VV": rng.normal(-12, 3, (3, H, W, 1)), "generated": real * 0.5, "real": real}
    path = viz.image_grid(rows, tmp_path / "sub" / "grid.png", scale=1)
    image = Image.open(path)
    assert image.format == "PNG"
    # 1 gray row + 2 optical rows x (RGB, NIR-R-G); 3 columns.
    assert image.size == (LABEL_WIDTH + viz.GAP + 3 * (W + viz.GAP), viz.GAP + 5 * (viz.MIN_ROW_HEIGHT + viz.GAP))
    grid = np.asarray(image.convert("RGB"))
    # generated is real/2 under one stretch: its tiles are darker, not re-stretched to look alike.
    generated = np.array([_cell_pixel(grid, 1, 0, y=y, x=x) for y in range(H) for x in range(W)])
    real_tile = np.array([_cell_pixel(grid, 3, 0, y=y, x=x) for y in range(H) for x in range(W)])
    assert generated.mean() < 0.7 * real_tile.mean()


def test_land_cover_palette_no_data_black_and_legend(tmp_path):
    labels = np.full((2, H, W), 255, np.uint8)
    labels[:, :, :3] = 0                       # water
    labels[1, :, :3] = 6                       # built
    onehot_pred = np.eye(9)[np.where(labels == 255, 1, labels)]   # scores: argmax
    path = viz.image_grid({"truth": labels, "prediction": onehot_pred},
                          tmp_path / "seg.png", kinds={"prediction": "labels"}, scale=1)
    image = Image.open(path)
    grid = np.asarray(image.convert("RGB"))
    hex_rgb = lambda h: tuple(int(h[i:i + 2], 16) for i in (1, 3, 5))
    assert _cell_pixel(grid, 0, 0) == hex_rgb(LULC_PALETTE[0])
    assert _cell_pixel(grid, 0, 1) == hex_rgb(LULC_PALETTE[6])
    assert _cell_pixel(grid, 0, 0, x=W - 1) == (0, 0, 0)            # 255 -> black
    assert _cell_pixel(grid, 1, 0, x=W - 1) == hex_rgb(LULC_PALETTE[1])  # argmax of scores
    # A legend below the grid holds every class colour.
    grid_bottom = viz.GAP + 2 * (viz.MIN_ROW_HEIGHT + viz.GAP)
    assert image.size[1] > grid_bottom
    legend = grid[grid_bottom:].reshape(-1, 3)
    for colour in LULC_PALETTE + ("#000000",):
        assert (legend == hex_rgb(colour)).all(axis=1).any(), colour


def test_percentile_stretch_is_robust_to_outliers():
    image = np.linspace(0, 1, 100).reshape(1, 10, 10, 1)
    image[0, 0, 0, 0] = 1000.0                  # one hot pixel must not darken the rest
    out = viz.percentile_stretch(image)
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.4 < out[0, 5, 0, 0] < 0.6
    assert (viz.percentile_stretch(np.full((1, 2, 2, 1), 3.0)) == 0).all()   # constant: no NaN
    nan_image = np.full((1, 2, 2, 1), np.nan)
    assert (viz.percentile_stretch(nan_image) == 0).all()


def test_grid_errors_name_the_row(tmp_path):
    with pytest.raises(ValueError, match="row 'real'.*B2, B3, B4, B8"):
        viz.image_grid({"real": np.zeros((1, H, W, 3))}, tmp_path / "x.png", kinds={"real": "optical"})
    with pytest.raises(ValueError, match="same number of images"):
        viz.image_grid({"a": np.zeros((1, H, W, 4)), "b": np.zeros((2, H, W, 4))}, tmp_path / "x.png")


def test_plot_curves_png(tmp_path):
    path = viz.plot_curves({"real": ([1, 2, 3], [0.2, 0.3, 0.35]), "mix": ([1, 2, 3], [0.25, 0.33, 0.4])},
                           tmp_path / "miou.png", xlabel="epoch", ylabel="validation mIoU",
                           title="real vs mix")
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (600, 400)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 10          # something was drawn, not a blank canvas
    with pytest.raises(ValueError, match="series 'mix'"):
        viz.plot_curves({"mix": ([1, 2], [0.1])}, tmp_path / "bad.png")


def _ink_rows(grid, display_row, row_height):
    """Offsets (from the row's top) of the lines with dark pixels in a display row's title."""
    top = viz.GAP + display_row * (row_height + viz.GAP)
    title = grid[top:top + row_height, :LABEL_WIDTH].min(axis=-1)
    return np.nonzero((title < 128).any(axis=1))[0]


def test_small_tiles_upsampled_nearest_and_single_line_titles(tmp_path):
    labels = np.random.default_rng(1).integers(0, 9, (2, 64, 64)).astype(np.uint8)
    real = np.random.default_rng(2).uniform(0, 0.3, (2, 64, 64, 4)).astype(np.float32)
    path = viz.image_grid({"real": real, "land cover": labels, "lulc": labels}, tmp_path / "g.png")
    grid = np.asarray(Image.open(path).convert("RGB"))
    scale, cell = 3, 192                         # a 64 px tile: the smallest factor to >= 192 px
    assert viz.auto_scale(64, 64) == scale and viz.auto_scale(256, 256) == 1
    assert viz.auto_scale(100, 100) == 2
    assert grid.shape[1] == LABEL_WIDTH + viz.GAP + 2 * (cell + viz.GAP)
    # Display rows: real RGB, real NIR-R-G, land cover, lulc.
    top = viz.GAP + 2 * (cell + viz.GAP)
    left = LABEL_WIDTH + viz.GAP + (cell + viz.GAP)
    tile = grid[top:top + cell, left:left + cell]
    expected = np.repeat(np.repeat(viz.colorize_labels(labels[1]), scale, 0), scale, 1)
    assert np.array_equal(tile, expected)        # every pixel a 3x3 block, no interpolation
    # Titles: "land cover" is not followed by a second "land cover" line; the
    # other rows say what is shown on a second line.
    one_line = _ink_rows(grid, 2, cell)
    assert one_line.size and one_line.max() < 17
    for row in (0, 1, 3):                        # real/RGB, real/NIR-R-G, lulc/land cover
        assert _ink_rows(grid, row, cell).max() > 17, row


def test_gather_to_host_keeps_key_order():
    import jax.numpy as jnp

    from rsjax import mesh as mesh_lib

    tree = {"real": jnp.ones(2), "generated": {"z": jnp.zeros(1), "a": 3}, "land cover": [
        {"y": jnp.ones(1), "b": jnp.ones(1)}]}
    host = mesh_lib.gather_to_host(tree)
    assert list(host) == ["real", "generated", "land cover"]       # not sorted
    assert list(host["generated"]) == ["z", "a"] and list(host["land cover"][0]) == ["y", "b"]
    assert isinstance(host["real"], np.ndarray) and host["generated"]["a"] == 3


def test_fusion_grid_rows_real_generated_land_cover(demo_data_dir, tmp_path):
    """The trainer's own call path (generator on a batch sharded over 8 devices,
    gather, grid): rows top to bottom are real, generated, land cover."""
    import jax

    from rsjax import input_pipeline
    from rsjax import mesh as mesh_lib
    from rsjax.trainers import fusion
    from trainer_utils import tiny_fusion_config

    config = tiny_fusion_config(demo_data_dir)
    mesh = mesh_lib.create_mesh()
    setup = fusion.Setup(config, fusion.selected_sources(config))
    state = mesh_lib.init_replicated(setup.init_state, mesh)
    batch = next(iter(input_pipeline.create_iterator(
        config.data, "validation", global_batch_size=8, mesh=mesh, train=False, seed=0,
        sources=setup.sources, num_epochs=1)))
    fusion._write_images(setup, state, batch, str(tmp_path), step=3)
    written = np.asarray(Image.open(tmp_path / "images" / "step_0000003.png").convert("RGB"))

    fake = np.asarray(jax.device_get(setup.generate_jit(False)(state, batch)))
    real, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
    expected = viz.render_grid({"real": real[:4], "generated": fake[:4], "land cover": labels[:4]})
    assert np.array_equal(written, expected)
    # Independently of render_grid: the last display row (below real RGB/NIR,
    # generated RGB/NIR) is the land-cover map of the first example.
    cell = 64 * viz.auto_scale(64, 64)
    top, left = viz.GAP + 4 * (cell + viz.GAP), LABEL_WIDTH + viz.GAP
    tile = written[top:top + cell:3, left:left + cell:3]
    assert np.array_equal(tile, viz.colorize_labels(labels[0]))


def test_column_titles_above_each_column(tmp_path):
    labels = np.zeros((2, H, W), np.uint8)
    plain = np.asarray(viz.render_grid({"truth": labels}, scale=1))
    titled = np.asarray(viz.render_grid({"truth": labels}, scale=1, column_titles=["best", "worst"]))
    assert titled.shape[0] == plain.shape[0] + viz.COLUMN_TITLE_HEIGHT
    assert np.array_equal(titled[viz.COLUMN_TITLE_HEIGHT:], plain)      # the grid moves down whole
    header = titled[:viz.COLUMN_TITLE_HEIGHT].min(axis=-1) < 128
    for column in range(2):
        left = LABEL_WIDTH + viz.GAP + column * (W + viz.GAP)
        assert header[:, left:left + 20].any(), column                # text over each column
    with pytest.raises(ValueError, match="1 column titles for 2 columns"):
        viz.image_grid({"truth": labels}, tmp_path / "x.png", column_titles=["one"])
