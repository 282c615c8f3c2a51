"""gmic-jax: a JAX/Flax reimplementation of GMIC (Shen et al., Medical Image Analysis 2021)."""

from setuptools import find_packages, setup

setup(
    name="gmic-jax",
    version="0.1.0",
    description="Globally-aware multiple instance classifier for screening mammograms, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["gmic_jax", "gmic_jax.*"]),
    install_requires=[
        "jax>=0.10",
        "jaxlib>=0.10",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "numpy>=1.26",
        "ml_collections>=1.0",
        "scipy>=1.11",
        "pillow>=10",
        "scikit-learn>=1.4",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "grain>=0.2.18",  # the version the input pipeline is tested with
        "absl-py>=1.0",  # gmic_jax.data.pipeline sets Grain's absl flags
        "filelock>=3.0",  # JAX's compilation cache needs it to bound its size (gmic_jax.xla_flags)
        "ml_dtypes>=0.4",  # bfloat16 tensors of torch checkpoints (gmic_jax.torch_format)
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "pytest-xdist>=3.5",
            "pydicom>=3.0",
            "tensorflow-datasets>=4.9.7",
            "ruff==0.17.6",
        ],  # pinned: another version may format differently and fail the check
        "data": ["pydicom>=3.0", "tensorflow-datasets>=4.9.7"],
        # tests/test_torch_format.py compares gmic_jax.torch_format with torch.load (converting needs no torch)
        "torch": ["torch>=2.2"],
        # benchmarks/memory_fwd_bwd.py --torch-ref: the original release imports torchvision 0.2.2
        "torch-ref": ["torch>=2.2", "torchvision==0.2.2.post3"],
        "gpu": ["jax[cuda12]>=0.10"],
    },
    entry_points={"console_scripts": ["gmic-jax=gmic_jax.cli:main"]},
)
