"""PyTorch side of `rsjax bench steps --against torch`: the RS-UNet train step in PyTorch.

    python -m rsjax.bench.pytorch --batch 4 --size 256 --steps 3

`build_unet`: a plain PyTorch U-Net with RS-UNet's layout (82,428,169
parameters, like rsjax's); `time_unet_step`: forward, cross-entropy, backward
and AdamW as RS-UNet trains; `--convs` (`time_conv_layers`): its 3x3
convolutions one by one instead. Printed as JSON, in its own process, so
PyTorch's and XLA's thread pools never compete. Needs the `bench` extra.
docs/benchmarks.md (section "The PyTorch side") gives the layout, the
optimizer's settings and the options.
"""
from __future__ import annotations

import statistics
import sys
import time

from rsjax import cli
from rsjax.errors import UserError

RS_UNET_PARAMETERS = 82_428_169    # RS-UNet at width 64, 4 bands, 9 classes (rsjax params)


def unet_layout(in_channels: int = 4, num_classes: int = 9, width: int = 64,
                depth: int = 5) -> dict:
    """RS-UNet's layout as (in, out) channels per block, the one description
    `build_unet` builds from: encoders and decoders are double convs, the
    upsamplers 2x2 stride-2 transposed convs, the head a 1x1 conv. Pure Python,
    so tests check it against rsjax's model without PyTorch."""
    widths = [width * 2 ** min(level, 4) for level in range(depth + 1)]
    return {
        "encoders": [(in_channels, widths[0])]
                    + [(widths[l - 1], widths[l]) for l in range(1, depth + 1)],
        "upsamplers": [(widths[l], widths[l - 1]) for l in range(1, depth + 1)],
        "decoders": [(2 * widths[l - 1], widths[l - 1]) for l in range(1, depth + 1)],
        "head": (widths[0], num_classes),
    }


def layout_parameter_shapes(layout: dict) -> dict[str, tuple[int, ...]]:
    """The parameters `build_unet(layout)` has, named and shaped as rsjax's
    RS-UNet names and shapes them (HWIO kernels; BatchNorm's weight is `scale`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for group in ("encoders", "decoders"):
        for i, (cin, cout) in enumerate(layout[group]):
            for j, c in enumerate((cin, cout)):
                shapes[f"{group}.{i}.conv_{j}.kernel"] = (3, 3, c, cout)
                shapes[f"{group}.{i}.norm_{j}.scale"] = (cout,)
                shapes[f"{group}.{i}.norm_{j}.bias"] = (cout,)
    for i, (cin, cout) in enumerate(layout["upsamplers"]):
        shapes[f"upsamplers.{i}.kernel"] = (2, 2, cin, cout)
        shapes[f"upsamplers.{i}.bias"] = (cout,)
    cin, classes = layout["head"]
    shapes["head.kernel"] = (1, 1, cin, classes)
    shapes["head.bias"] = (classes,)
    return shapes


def build_unet(in_channels: int = 4, num_classes: int = 9, width: int = 64, depth: int = 5):
    """The PyTorch U-Net, written for this benchmark from `unet_layout`."""
    import torch
    from torch import nn

    layout = unet_layout(in_channels, num_classes, width, depth)

    def double_conv(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoders = nn.ModuleList([double_conv(*io) for io in layout["encoders"]])
            self.upsamplers = nn.ModuleList(
                [nn.ConvTranspose2d(*io, 2, stride=2) for io in layout["upsamplers"]])
            self.decoders = nn.ModuleList([double_conv(*io) for io in layout["decoders"]])
            self.head = nn.Conv2d(*layout["head"], 1)

        def forward(self, x):
            skips = []
            for level, encoder in enumerate(self.encoders):
                if level:
                    x = nn.functional.max_pool2d(x, 2)
                x = encoder(x)
                skips.append(x)
            for level in range(depth, 0, -1):
                x = self.upsamplers[level - 1](x)
                x = self.decoders[level - 1](torch.cat([skips[level - 1], x], dim=1))
            return self.head(x)

    model = UNet()
    want = sum(_size(s) for s in layout_parameter_shapes(layout).values())
    if count_parameters(model) != want:       # the layout's figure is what tests check
        raise AssertionError(f"PyTorch U-Net has {count_parameters(model)} parameters, "
                             f"its layout {want}")
    return model


def unet_conv_layers(size: int, in_channels: int = 4, width: int = 64,
                     depth: int = 5) -> list[dict]:
    """The 3x3 convolutions of RS-UNet's step at `size` px, one entry per
    distinct (in, out, resolution): `count` how many the step has, `names` which,
    `input_grad` whether the step needs the gradient of its input (not for the
    first layer, which reads the image). Pure Python, like `unet_layout`."""
    layout = unet_layout(in_channels, 9, width, depth)
    convs = []
    for group in ("encoders", "decoders"):
        for level, (cin, cout) in enumerate(layout[group]):
            resolution = size // 2 ** level      # decoder l works at encoder l's
            for j, c in enumerate((cin, cout)):
                first = group == "encoders" and level == 0 and j == 0
                convs.append((f"{group}.{level}.conv_{j}", c, cout, resolution, not first))
    layers: dict[tuple, dict] = {}
    for name, cin, cout, resolution, input_grad in convs:
        key = (cin, cout, resolution, input_grad)
        entry = layers.setdefault(key, {"in": cin, "out": cout, "resolution": resolution,
                                        "input_grad": input_grad, "count": 0, "names": []})
        entry["count"] += 1
        entry["names"].append(name)
    return sorted(layers.values(), key=lambda l: (-l["resolution"], l["in"], l["out"]))


def conv_layer_gflop(layer: dict, batch: int) -> float:
    """GFLOP of one layer's forward + gradients (2 per multiply-add, every tap):
    the forward pass and the kernel gradient, and the input gradient where the
    step needs it, each the same count."""
    forward = 2.0 * batch * layer["resolution"] ** 2 * layer["in"] * layer["out"] * 9
    return forward * (3 if layer["input_grad"] else 2) / 1e9


def _time_calls(call, steps: int) -> tuple[float, list[float]]:
    """Seconds of a first (warm-up) call and of each of `steps` more."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first, times


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def time_unet_step(batch: int, size: int, steps: int = 3, threads: int = 0,
                   dtype: str = "float32", seed: int = 0, width: int = 64, depth: int = 5) -> dict:
    """Seconds per train step (median of `steps` after one warm-up step)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_unet(width=width, depth=depth).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999),
                                  weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=255)
    x = torch.randn(batch, 4, size, size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 9, (batch, size, size))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach().item()

    warmup, times = _time_calls(step, steps)
    seconds = statistics.median(times)
    return {"framework": "pytorch", "torch_version": torch.__version__,
            "threads": torch.get_num_threads(), "batch": batch, "size": size, "dtype": dtype,
            "width": width, "depth": depth,
            "parameters": count_parameters(model), "seconds_per_step": seconds,
            "seconds_min": min(times), "images_per_second": batch / seconds,
            "first_step_seconds": warmup, "steps": steps}


def time_conv_layers(layers: list[dict], batch: int, steps: int = 3, threads: int = 0,
                     dtype: str = "float32", seed: int = 0) -> dict:
    """Seconds of each layer's forward + gradients (median of `steps` after a
    warm-up), channels-last as the U-Net runs, the output's cotangent given."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = []
    for layer in layers:
        n = layer["resolution"]
        x = torch.randn(batch, layer["in"], n, n).to(memory_format=torch.channels_last)
        x.requires_grad_(layer["input_grad"])
        conv = torch.nn.Conv2d(layer["in"], layer["out"], 3, padding=1, bias=False).to(
            memory_format=torch.channels_last)
        dy = torch.randn(batch, layer["out"], n, n).to(memory_format=torch.channels_last)

        def step():
            conv.weight.grad = None
            x.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                y = conv(x)
            y.backward(dy.to(y.dtype))

        _, times = _time_calls(step, steps)
        out.append({"in": layer["in"], "out": layer["out"], "resolution": n,
                    "input_grad": layer["input_grad"],
                    "seconds": statistics.median(times), "seconds_min": min(times)})
    return {"framework": "pytorch", "torch_version": torch.__version__,
            "threads": torch.get_num_threads(), "batch": batch, "dtype": dtype, "steps": steps,
            "layers": out}


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--size", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    parser.add_argument("--threads", type=int, default=0,
                        help="PyTorch CPU threads (0: PyTorch's default, one per core)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype (bfloat16 through CPU autocast)")
    parser.add_argument("--width", type=cli.positive_int, default=64,
                        help="channels of the first level (RS-UNet's model.width)")
    parser.add_argument("--depth", type=cli.positive_int, default=5,
                        help="down-sampling stages (RS-UNet's model.depth)")
    parser.add_argument("--convs", action="store_true",
                        help="time the U-Net's 3x3 convolutions one by one (forward + "
                             "gradients) instead of its train step")


def run(args) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UserError("rsjax bench steps --against torch needs PyTorch: pip install 'rsjax[bench]' "
                        "(on CPU-only machines take the CPU build: pip install torch "
                        "--index-url https://download.pytorch.org/whl/cpu).") from None
    if args.size % 2**args.depth:
        raise UserError(f"--size {args.size}: a {args.depth}-level U-Net needs a multiple "
                        f"of {2**args.depth}.")
    if args.convs:
        layers = unet_conv_layers(args.size, width=args.width, depth=args.depth)
        cli.print_json(time_conv_layers(layers, args.batch, args.steps, args.threads,
                                        args.dtype))
    else:
        cli.print_json(time_unet_step(args.batch, args.size, args.steps, args.threads,
                                      args.dtype, width=args.width, depth=args.depth))
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
