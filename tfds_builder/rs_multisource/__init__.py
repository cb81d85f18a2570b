"""The rs_multisource TFDS dataset (see rs_multisource_dataset_builder.py and README.md)."""
