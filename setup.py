"""Installs jaxcl: contrastive pre-training for label-efficient medical image segmentation."""

import pathlib

import setuptools

setuptools.setup(
    name="jaxcl",
    version="0.1.0",
    description=(
        "JAX/Flax global and local contrastive pre-training (and BYOL) of a 2D UNet "
        "for medical image segmentation with few labels."
    ),
    long_description=pathlib.Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["jaxcl", "jaxcl.*"]),
    install_requires=[
        "absl-py>=2.1",
        "array-record>=0.5",  # the slice store of large pre-training pools
        "chex>=0.1.87",
        "clu>=0.0.12",
        "flax>=0.10",
        "jax>=0.4.35",
        "matplotlib>=3.8",
        "ml-collections>=0.1.1",
        "nibabel>=5.2",
        "numpy>=1.26",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "scipy>=1.11",
        "tensorboard>=2.16",
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9.6",
        "tqdm>=4.66",
    ],
    extras_require={
        "test": ["pytest>=8.0", "ruff>=0.17,<0.18"],
        "n4": ["SimpleITK>=2.3"],
    },
)
