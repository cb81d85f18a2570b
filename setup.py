"""rsjax: multi-source remote-sensing fusion (RS-SPADE) and segmentation in JAX/Flax.

The checkout's top-level folders `configs/`, `launch/` and `tfds_builder/` are
installed under the package (`rsjax.configs`, `rsjax.launch`,
`rsjax.tfds_builder`), so configs are found by name from any directory after
`pip install .`, and rsjax adds no top-level packages with generic names.
"""
from setuptools import find_packages, setup

CORE = [
    # Checked together on Python 3.11, CPU, 2026-11 (see docs/dependencies.md).
    # Upper bounds where the API moves fast between minor releases.
    "jax>=0.10,<0.11",
    "flax>=0.12,<0.13",          # the NNX API
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "tensorflow-datasets>=4.9.7,<5",
    "importlib_resources",       # tensorflow-datasets needs it and does not declare it
    "array-record>=0.8,<0.9",
    "grain>=0.2.12,<0.3",
    "rasterio>=1.4,<1.5",        # the wheel carries GDAL
    "ml-collections>=1.0,<2",
    "absl-py>=2.1",
    "dm-pix>=0.4.3",
    "numpy>=1.26",
    "etils[epath]>=1.7",
    "matplotlib>=3.8",           # PNG plots (metric curves, the report)
    "pillow>=10",                # PNG image grids, pixel-exact
    "tqdm>=4.66",
    "psutil>=5.9",               # peak-memory figures in the benchmarks
    "scipy>=1.11",               # Student-t quantiles for the experiments' intervals
    "tensorboardX>=2.6,<3",      # TensorBoard event files without TensorFlow (small, pure Python)
]

EXTRAS = {
    # The tests' own needs, so that the README's one test command runs every test:
    # scikit-image: the SSIM/PSNR reference; apache-beam: the Beam build's tests;
    # fsspec[http]: HTTP folder listing in the object-storage tests; TensorFlow (CPU)
    # and dill: TFDS's DatasetBuilderTestCase and the TFRecord build (TensorFlow installs
    # beside jax 0.10 without moving any other pin, ~1.3 GB); pytest-xdist: the suite
    # runs on every core (pytest.ini), one test file per worker.
    "test": ["pytest>=8", "pytest-xdist>=3.6,<4", "scikit-image>=0.24", "apache-beam>=2.77,<3",
             "fsspec[http]", "tensorflow-cpu>=2.18", "dill"],
    "tf": ["tensorflow-cpu>=2.18", "dill"],          # the TFRecord build (rsjax build --file_format tfrecord)
    "tensorboard": [],           # kept so `pip install rsjax[tensorboard]` still works: now core
    "gpu": ["jax[cuda12]>=0.10,<0.11"],
    "tpu": ["jax[tpu]>=0.10,<0.11", "etils[epath-gcs]"],
    "gcs": ["etils[epath-gcs]"],   # gs:// workdirs and data_dirs off TPU VMs
    # Scenes in object storage: folder listing on gs://, s3:// (epath) and http(s):// (fsspec);
    # the pixels are read by GDAL in rasterio's wheel, which needs none of these.
    "s3": ["etils[epath-s3]"],
    "remote": ["etils[epath-gcs,epath-s3]", "fsspec[http]"],
    "ee": ["earthengine-api>=1.0"],  # rsjax export_ee (not needed for its --dry_run)
    # The dataset built on Apache Beam (DirectRunner here; Dataflow, Flink or Spark runners).
    # Checked with the pins above: it moves protobuf to 6.33, pyarrow to 25, pillow to 12.3 (no conflict).
    "beam": ["apache-beam>=2.77,<3"],
    # rsjax bench --against torch: PyTorch's U-Net step in the same run. PyPI's
    # Linux wheel is the CUDA build; on machines without a GPU install the CPU
    # build first: pip install torch --index-url https://download.pytorch.org/whl/cpu
    "bench": ["torch>=2.13,<2.14"],
}

# Where each installed package lives in the checkout.
PACKAGE_DIRS = {
    "rsjax.configs": "configs",
    "rsjax.launch": "launch",
    "rsjax.tfds_builder": "tfds_builder",
}


def packages() -> list[str]:
    found = find_packages(include=["rsjax", "rsjax.*"])
    for name, folder in PACKAGE_DIRS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return found


setup(
    name="rsjax",
    version="0.2.0",
    description="Multi-source remote-sensing fusion (RS-SPADE) and segmentation in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=packages(),
    package_dir=PACKAGE_DIRS,
    package_data={"rsjax.tfds_builder.rs_multisource": [
        "*.md", "*.bib", "*.txt", "*.tsv", "dummy_data/*", "dummy_data/**/*"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["rsjax = rsjax.cli:main"]},
    license="Apache-2.0",
    classifiers=["License :: OSI Approved :: Apache Software License",
                 "Programming Language :: Python :: 3.11"],
)
