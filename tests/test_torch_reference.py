"""RS-UNet against an independent implementation: PyTorch's layers (the U-Net
`rsjax bench steps --against torch` times, rsjax.bench.pytorch.build_unet) given
rsjax's weights compute the same logits. PyTorch (CPU) is in the test extra."""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from rsjax.bench import pytorch as bench_torch
from rsjax.models.unet import RSUNet


def torch_name(path: tuple) -> str:
    """rsjax's RS-UNet parameter path -> the PyTorch U-Net's state_dict key.

    A double conv is nn.Sequential(conv, BN, ReLU, conv, BN, ReLU): conv_j is
    item 3j, norm_j item 3j + 1; BatchNorm's scale is `weight`, its statistics
    `running_mean` and `running_var`."""
    *module, leaf = [str(p) for p in path]
    leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
            "var": "running_var"}.get(leaf, leaf)
    if module[0] in ("encoders", "decoders"):
        group, index, layer = module
        kind, j = layer.split("_")
        module = [group, index, str(3 * int(j) + (kind == "norm"))]
    return ".".join(module + [leaf])


def torch_layout(name: str, value: np.ndarray) -> np.ndarray:
    """rsjax keeps kernels HWIO; PyTorch's Conv2d wants OIHW, its ConvTranspose2d
    IOHW (rsjax's transposed conv adds x[i] @ kernel[t] at 2i + t, as PyTorch does:
    no flip)."""
    if value.ndim != 4:
        return value
    return value.transpose(2, 3, 0, 1) if name.startswith("upsamplers") else value.transpose(3, 2, 0, 1)


def test_rs_unets_weights_in_pytorchs_unet_give_the_same_logits():
    torch = pytest.importorskip("torch", reason="PyTorch (CPU) is in the test extra")
    width, depth = 4, 2
    ours = RSUNet(4, 9, width=width, depth=depth, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    # BatchNorm in eval mode with statistics and affine terms away from their
    # initial values, so that a swapped mean/var or scale/bias shows.
    state = nnx.state(ours)
    flat = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}
    for path, value in flat.items():
        if path[-1] in ("mean", "scale", "bias"):
            flat[path] = rng.normal(0.0, 0.5, value.shape).astype(np.float32)
        elif path[-1] == "var":
            flat[path] = rng.uniform(0.5, 2.0, value.shape).astype(np.float32)
    for path, v in nnx.to_flat_state(state):
        v.value = flat[path]
    nnx.update(ours, state)
    ours.eval()

    theirs = bench_torch.build_unet(4, 9, width=width, depth=depth).eval()
    target = theirs.state_dict()
    loaded = {}
    for path, value in flat.items():
        name = torch_name(path)
        loaded[name] = torch.from_numpy(np.ascontiguousarray(torch_layout(name, value)))
        assert tuple(loaded[name].shape) == tuple(target[name].shape), name
    missing = set(target) - set(loaded)
    assert missing <= {k for k in target if k.endswith("num_batches_tracked")}, missing
    theirs.load_state_dict(loaded, strict=False)

    x = rng.normal(size=(2, 16, 16, 4)).astype(np.float32)
    want = theirs(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    got = np.asarray(ours(x))
    assert got.shape == (2, 16, 16, 9)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
