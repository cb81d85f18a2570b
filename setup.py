"""rsjax: multi-source remote-sensing fusion (RS-SPADE) and segmentation in JAX/Flax."""
from setuptools import find_packages, setup

CORE = [
    # Checked together on Python 3.11, CPU, 2026-11 (see README "Dependencies").
    "jax>=0.10,<0.11",
    "flax>=0.12,<0.13",          # the NNX API
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "tensorflow-datasets>=4.9.7,<5",
    "importlib_resources",       # tensorflow-datasets needs it and does not declare it
    "array-record>=0.8",
    "grain>=0.2.12",
    "rasterio>=1.4,<1.5",        # the wheel carries GDAL
    "ml-collections>=1.0",
    "absl-py>=2.1",
    "dm-pix>=0.4.3",
    "numpy>=1.26",
    "etils[epath]>=1.7",
    "matplotlib>=3.8",           # PNG plots (metric curves)
    "pillow>=10",                # PNG image grids, pixel-exact
    "tqdm>=4.66",
    "psutil>=5.9",               # peak-memory figures in the benchmarks
]

EXTRAS = {
    "test": ["pytest>=8", "scikit-image>=0.24"],   # scikit-image: the SSIM/PSNR reference
    "tf": ["tensorflow-cpu>=2.18", "dill"],          # dill: TFDS's DatasetBuilderTestCase
    "tensorboard": ["tensorboardX>=2.6"],
    "gpu": ["jax[cuda12]>=0.10,<0.11"],
    "tpu": ["jax[tpu]>=0.10,<0.11", "etils[epath-gcs]"],
    "gcs": ["etils[epath-gcs]"],   # gs:// workdirs and data_dirs off TPU VMs
}

setup(
    name="rsjax",
    version="0.1.0",
    description="Multi-source remote-sensing fusion (RS-SPADE) and segmentation in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rsjax", "rsjax.*", "tfds_builder", "tfds_builder.*"]),
    package_data={"tfds_builder.rs_multisource": ["*.md", "*.bib", "*.tsv", "dummy_data/**/*"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
