"""Cloud TPU VM launch scripts for rsjax (installed as rsjax.launch): `rsjax tpu --help`."""
