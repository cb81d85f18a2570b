"""rsjax: multi-source remote-sensing fusion and segmentation in JAX/Flax."""

from importlib import metadata as _metadata

try:  # One version: the one pyproject.toml gives the installed package.
    __version__ = _metadata.version("rsjax")
except _metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"
