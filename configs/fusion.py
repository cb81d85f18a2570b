"""RS-SPADE fusion training: SAR + land cover + terrain -> 4-band Sentinel-2.

    rsjax train --config fusion --workdir work/fusion
    rsjax train --config fusion:demo --workdir work/demo

Arguments (comma-separated after ':'):
- a scale: none (the reference sizes: ngf 64, 256 px, 100k steps), `demo`
  (small model and tiles, the whole run on 2 CPU cores in minutes), `bench`
  (the experiments' scale on 2 CPU cores: the demo's models, longer, on the
  larger `synthetic_bench` dataset), `paper` (the paper's setting: full-width
  models, 256 px tiles of `synthetic_paper`, 50 epochs of 1,558 tiles);
- `manual`: train on your own exports instead of synthetic scenes (any
  scale: `fusion:manual` at the reference sizes, `fusion:manual,demo` small):
  `--config.data.manual_dir=DIR` (the folder of `<scene>_s2.tif`, `_s1.tif`,
  `_lulc.tif`, `_dem.tif`), 256 px tiles unless `--config.data.tile_size=N`;
  the dataset is built on first use and found again afterwards;
- `sources=lulc+s1+dem` (any non-empty subset);
- `model=rs_spade|pix2pix|flow` (flow: the rectified-flow generator of
  rsjax.models.flow, sampled in `--config.flow.sample_steps` Euler or Heun steps);
- `objective=spade|pix2pix|spade+l1`: the GAN objective, by default the
  model's own (RS-SPADE: hinge + feature matching x10; pix2pix: vanilla GAN +
  L1 x100); `spade+l1` adds pix2pix's L1 x100 term to SPADE's, so that
  RS-SPADE and pix2pix can be compared with the same pixel loss;
- `steps=N` or `epochs=E`: the run's length (in epochs of its own training set;
  the bench and paper scales train 5 and 50 epochs by default);
- cloud removal: `sources=s2_cloudy+s1+dem+lulc` (or any subset with the
  cloudy image) trains on the scale's dataset under clouds
  (`synthetic_cloudy_demo`, ...), the cloudy image being one more source with
  its own embedding; `clouds` trains the paper's sources on that dataset (its
  evaluation then scores cloud removal too).
Any field can be overridden: `--config.total_steps=10`.
"""
import ml_collections

from rsjax.configs import common


OBJECTIVES = {
    # name: (GAN loss, feature matching weight, L1 weight)
    "spade": ("hinge", 10.0, 0.0),
    "pix2pix": ("vanilla", 0.0, 100.0),
    "spade+l1": ("hinge", 10.0, 100.0),
}


def set_objective(gan: ml_collections.ConfigDict, name: str) -> None:
    if name not in OBJECTIVES:
        raise ValueError(f"objective='{name}': choose one of {', '.join(OBJECTIVES)}.")
    gan.loss, gan.lambda_feat, gan.lambda_l1 = OBJECTIVES[name]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = common.parse_arg(arg, demo=False, bench=False, paper=False, sources="all",
                         model="rs_spade", objective="", steps=0, epochs=0.0, clouds=False,
                         manual=False)
    scale = common.scale_of(a)
    small = scale in ("demo", "bench")
    sources = common.parse_sources(a.sources)
    c = common.optical_output_config("fusion", scale, sources, manual=a.manual,
                                     clouds=common.wants_clouds(a.clouds, sources))

    if a.model == "rs_spade":
        # NVlabs SPADE defaults: ngf/ndf 64, multi-scale PatchGAN (2 scales, 4 layers),
        # hinge loss, feature matching x10, TTUR Adam (G 1e-4, D 4e-4, betas 0/0.9).
        c.generator = ml_collections.ConfigDict(dict(name="rs_spade", ngf=64, embed_dim=32,
                                                     spade_hidden=128))
        c.discriminator = ml_collections.ConfigDict(dict(
            name="multiscale_patchgan", ndf=64, n_layers=4, num_scales=2))
        c.gan = ml_collections.ConfigDict(dict(loss="hinge", lambda_feat=10.0, lambda_l1=0.0,
                                               lambda_ssim=0.0, reuse_generator_forward=True))
        c.optim = ml_collections.ConfigDict(dict(g_lr=1e-4, d_lr=4e-4, b1=0.0, b2=0.9,
                                                 decay_start_step=None))
    elif a.model == "pix2pix":
        # junyanz pix2pix: U-Net-256, 70x70 PatchGAN, vanilla GAN + L1 x100, Adam 2e-4 (0.5, 0.999).
        c.generator = ml_collections.ConfigDict(dict(name="pix2pix_unet", ngf=64, num_downs=8))
        c.discriminator = ml_collections.ConfigDict(dict(
            name="patchgan", ndf=64, n_layers=3, norm="batch", use_spectral_norm=False))
        c.gan = ml_collections.ConfigDict(dict(loss="vanilla", lambda_feat=0.0, lambda_l1=100.0,
                                               lambda_ssim=0.0, reuse_generator_forward=True))
        c.optim = ml_collections.ConfigDict(dict(g_lr=2e-4, d_lr=2e-4, b1=0.5, b2=0.999,
                                                 decay_start_step=None))
    elif a.model == "flow":
        # Rectified flow (rsjax.models.flow): a U-Net velocity network with
        # RS-SPADE's per-source embeddings modulating every block, Adam 1e-4
        # (1e-3 at the small scales, below), sampled in 8 Euler steps; no
        # discriminator, no GAN objective.
        c.generator = ml_collections.ConfigDict(dict(
            name="flow_unet", ngf=64, channel_mults=(1, 2, 4), embed_dim=32, hidden=128,
            time_dim=256, groups=8))
        c.flow = ml_collections.ConfigDict(dict(sample_steps=8, solver="euler",
                                                time_sampling="logit_normal"))
        c.optim = ml_collections.ConfigDict(dict(lr=1e-4, b1=0.9, b2=0.999,
                                                 decay_start_step=None))
        if a.objective:
            raise ValueError(f"objective='{a.objective}': the flow model has no GAN objective.")
    else:
        raise ValueError(f"model='{a.model}': choose rs_spade, pix2pix or flow.")
    if a.model != "flow":
        set_objective(c.gan, a.objective or ("spade" if a.model == "rs_spade" else "pix2pix"))

    c.ema_decay = 0.999
    # The GANs are scored on their own weights (the same for every model in the
    # experiments); the flow model on its EMA weights, part of the method.
    c.eval_use_ema = a.model == "flow"
    common.add_image_model_loop_settings(c, scale=scale, steps=a.steps, epochs=a.epochs)
    if small:
        # Small enough that building the synthetic dataset and training finish on
        # 2 CPU cores in minutes, big enough that the sources visibly help.
        if a.model == "rs_spade":
            c.generator.ngf = 16
            c.generator.spade_hidden = 32
            c.discriminator.ndf = 16
            c.discriminator.n_layers = 3
        elif a.model == "flow":
            c.generator.ngf = 16
            c.generator.hidden = 32
            c.generator.time_dim = 64
            # Runs of hundreds of steps: at 1e-4 a 600-step demo run reached 9.3 dB
            # PSNR on the test tiles, at 1e-3 21.2 dB (one run each, 2026-12-07,
            # records/flow-demo-lr-2026-12-07).
            c.optim.lr = 1e-3
        else:
            c.generator.ngf = 16
            c.generator.num_downs = 6      # 64 px tiles
            c.discriminator.ndf = 16
    return c
