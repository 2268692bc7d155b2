"""vmc_jax: Video Motion Customization (VMC) on the Show-1 cascade, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="vmc_jax",
    version="0.1.0",
    description="Video Motion Customization (arXiv 2312.00845) for TPU and GPU in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vmc_jax", "vmc_jax.*"]),
    # the pretrained moving-shapes world UNet (fp16) and its loss log; the CPU kernels, built on first use
    package_data={"vmc_jax": ["assets/*", "kernels/*.cc"]},
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "transformers>=4.40",
        "huggingface_hub>=0.23",  # `vmc-jax download`: snapshot_download, its cache, tokens and gated-repo errors
        "einops>=0.8",
        "imageio>=2.34",
        "imageio-ffmpeg>=0.5",
        "ml_collections>=0.1.1",
        "safetensors>=0.4.3",
        "sentencepiece>=0.2",  # the T5 tokenizers of Show-1 / IF ship only spiece.model
        "numpy>=1.26",
        "ml_dtypes>=0.4",
        "absl-py>=2.0",
        "tqdm>=4.66",
        # A run's metrics as TensorBoard events: tensorboardX writes them with protobuf alone (no TensorFlow).
        "tensorboardX>=2.6",
        "matplotlib>=3.8",  # the curves' PNG at the end of a run (Agg, no display)
    ],
    extras_require={
        # torch and diffusers are only the references the parity tests compare against.
        # pytest-xdist: the suite's modules on every CPU (most of a test's time is tracing on one core).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "diffusers>=0.30"],
        # libtpu: `vmc-jax plan --target=v5e:2x2` compiles for TPU topologies on any host (and runs on TPU VMs).
        "tpu": ["jax[tpu]==0.10.2"],
        # NVIDIA GPUs (CUDA 12 wheels of jaxlib, cuDNN included).
        "cuda12": ["jax[cuda12]==0.10.2"],
    },
    entry_points={"console_scripts": ["vmc-jax=vmc_jax.cli:run"]},
)
