"""Cloud removal with DSen2-CR (Meraner et al. 2020) or UnCRtainTS (Ebel et
al. 2023, mono-temporal, with a per-pixel variance): cloudy S2 + S1 -> clear S2.

    rsjax train --config cloud_removal:demo --workdir work/dsen2cr_demo
    rsjax train --config cloud_removal:demo,model=uncrtaints --workdir work/uncrtaints_demo
    rsjax train --config cloud_removal:demo,sources=s2_cloudy+s1+dem+lulc --workdir ...

Trains on the synthetic scenes under clouds (`synthetic_cloudy`,
`synthetic_cloudy_demo`, `_bench`, `_paper`: the scale's scenes with clouds).
Arguments (comma-separated after ':'): `model=` dsen2cr (default) or
uncrtaints, a scale (none: the published network
at 256 px; `demo`: a narrower, shallower network on 64 px tiles, minutes on
2 CPU cores; `bench`: the demo's network, longer, on the bench scenes;
`paper`: the published network on the paper-scale scenes), `sources=` the
inputs (the cloudy image `s2_cloudy` and any of lulc, s1, dem; DSen2-CR's
own are s2_cloudy+s1), `steps=N` or `epochs=E`, `manual` (your own exports with a cloudy
image, `<scene>_s2_cloudy.tif`, in `--config.data.manual_dir=DIR`: the
`manual_cloudy` dataset). Any field can be overridden:
`--config.model.num_blocks=8`.

Full size is the published network and training setting: width F 256,
B 16 residual blocks scaled by 0.1, the CARL loss with weight 1, Nadam at a
learning rate of 7e-5 (beta 0.9, 0.999), batch 16. The demo and bench scales
narrow it to F 64 and B 6 and train at 5e-4 (a few hundred steps at 7e-5
barely move a network of any width), decaying linearly over the second half
as every scale but the full one does.

UnCRtainTS at every scale is its published network (width 128, one
GroupNorm MBConv block then five BatchNorm ones, a mean and a variance per
band: 0.52 M parameters) trained with its Gaussian negative log-likelihood;
at full size with the published setting (Adam at 1e-3, batch 4, no decay),
at the other scales with their batch sizes and decay, at the same rate.
"""
import ml_collections

from rsjax.configs import common




def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = common.parse_arg(arg, demo=False, bench=False, paper=False, sources="s2_cloudy+s1", steps=0,
                         epochs=0.0, manual=False, model="dsen2cr")
    scale = common.scale_of(a)
    small = scale in ("demo", "bench")
    sources = common.parse_sources(a.sources)
    if "s2_cloudy" not in sources:
        raise ValueError(f"sources='{a.sources}': cloud removal needs s2_cloudy (e.g. s2_cloudy+s1).")
    c = common.optical_output_config("cloud_removal", scale, sources, clouds=True, manual=a.manual)
    if a.model == "uncrtaints":
        c.model = ml_collections.ConfigDict(dict(name="uncrtaints", width=128, encoder_blocks=1,
                                                 decoder_blocks=5))
        c.optim = ml_collections.ConfigDict(dict(name="adam", lr=1e-3, b1=0.9, b2=0.999,
                                                 decay_start_step=None))
        common.add_image_model_loop_settings(c, scale=scale, steps=a.steps, epochs=a.epochs)
        if scale == "full":
            c.global_batch_size = c.eval_batch_size = 4
        return c
    if a.model != "dsen2cr":
        raise ValueError(f"model='{a.model}': choose dsen2cr or uncrtaints.")
    c.model = ml_collections.ConfigDict(dict(name="dsen2cr", features=256, num_blocks=16,
                                             residual_scale=0.1))
    c.loss = ml_collections.ConfigDict(dict(carl_weight=1.0))
    c.optim = ml_collections.ConfigDict(dict(name="nadam", lr=7e-5, b1=0.9, b2=0.999,
                                             decay_start_step=None))
    common.add_image_model_loop_settings(c, scale=scale, steps=a.steps, epochs=a.epochs)
    if small:
        c.model.features = 64
        c.model.num_blocks = 6
        c.optim.lr = 5e-4
    return c
