"""RS-UNet land-cover segmentation on the 4 Sentinel-2 bands (the paper's Table 3).

    rsjax train --config segmentation:demo,data=real --workdir work/seg_real
    rsjax train --config segmentation:demo,data=mix \
        --config.data.generated_dir=work/fusion_demo/generated --workdir work/seg_mix

`data=real` trains on real tiles only (the paper's True Dataset); `data=mix`
adds generated images, `data.mix_rate` per real tile (default 1, the paper's
1:1; `data.mix_all=True` takes every generated image there is), each paired
with its tile's real land-cover map; `data.generated_dir`
names the folder(s) of generated images ('+'-separated). Validation and test
always use real tiles. Scales as in the fusion config: none, `demo`, `bench`,
`paper`; `steps=N` or `epochs=E` sets the length (bench and paper: 4 and 50
epochs of the run's own training set, real plus generated in a Mix run); `manual` trains on your own exports
(`--config.data.manual_dir=DIR`, as in the fusion config).
"""
import ml_collections

from rsjax.configs import common


# Bench: 4 epochs of each arm's own training set (336 steps of batch 8 on
# the 672 real tiles; a Mix 1:1 run twice that): a one-core worker's U-Net
# step takes 0.53 s at 64 px, and Table 3 trains 18 U-Nets at bench scale.
# BENCH_STEPS is the length when epochs are turned off (epochs=0 with steps).
BENCH_STEPS = 300
BENCH_EPOCHS = 4


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = common.parse_arg(arg, demo=False, bench=False, paper=False, data="real", steps=0,
                         epochs=0.0, manual=False)
    if a.data not in ("real", "mix"):
        raise ValueError(f"data='{a.data}': choose real or mix.")
    scale = common.scale_of(a)
    c = ml_collections.ConfigDict()
    c.trainer = "segmentation"
    c.seed = 0
    c.data = common.data_config(scale, manual=a.manual)
    c.data.sources = ()                  # the U-Net sees the optical image only
    c.data.train_data = a.data
    c.data.generated_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.mix_rate = 1.0                # generated images per real tile (data=mix)
    # True: every generated image in generated_dir, whatever the rate (new
    # layouts: images of tiles the real part does not hold, so their number
    # follows from the split).
    c.data.mix_all = False
    c.in_channels = 4
    c.dtype = "float32"              # or "bfloat16" (compute only; params stay float32)
    c.model = ml_collections.ConfigDict(dict(name="rs_unet", width=64, depth=5))
    # Cross-entropy class weights from the train split's class frequencies:
    # none, or a weighting of rsjax.losses.class_weights_from_counts.
    c.class_weights = "none"
    # The model a run is scored and used with: its best validation mIoU
    # checkpoint (the paper's "best model"), or "last".
    c.evaluate_checkpoint = "best_validation"
    c.optim = ml_collections.ConfigDict(dict(lr=1e-3, b1=0.9, b2=0.999, weight_decay=1e-4,
                                             decay_start_step=None))
    common.add_loop_settings(
        c, scale=scale, steps=a.steps,
        total_steps={"full": 20_000, "demo": 300, "bench": BENCH_STEPS, "paper": common.PAPER_STEPS},
        eval_every_steps={"full": 1000, "demo": 50, "bench": 50, "paper": 100},
        epochs=a.epochs, total_epochs={"bench": BENCH_EPOCHS, "paper": common.PAPER_EPOCHS})
    if scale in ("demo", "bench"):
        c.model.width = 16
    return c
