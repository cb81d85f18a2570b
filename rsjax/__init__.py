"""rsjax: multi-source remote-sensing fusion and segmentation in JAX/Flax."""

__version__ = "0.1.0"
