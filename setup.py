"""The package mapping pyproject.toml cannot express with a find directive.

The checkout's top-level folders `configs/`, `launch/` and `tfds_builder/` are
installed under the package (`rsjax.configs`, `rsjax.launch`,
`rsjax.tfds_builder`), so configs are found by name from any directory after
`pip install .`, and rsjax adds no top-level packages with generic names.
Everything else (name, version, dependencies, extras) is in pyproject.toml.
"""
from setuptools import find_packages, setup

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


setup(packages=packages(), package_dir=PACKAGE_DIRS)
