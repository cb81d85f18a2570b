"""Cloud TPU VM launch scripts for rsjax: `python -m launch.tpu --help`."""
