"""jepa: V-JEPA 2 world-model pretraining in JAX/Flax."""
from setuptools import find_packages, setup

# One range for the CPU build and every accelerator build, so an accelerator extra never moves JAX off the
# version the code is tested with.
JAX = ">=0.10,<0.11"

setup(
    name="jepa",
    version="0.1.0",
    description="V-JEPA 2 video world-model pretraining, probing and planning in JAX/Flax",
    license="Apache-2.0",
    license_files=["LICENSE"],
    # configs/ is shipped as the package jepa.configs, so that `--config=quickstart` (or the installed file's
    # path) works after a non-editable install; in a checkout, configs/*.py stay where the README shows them.
    packages=[*find_packages(include=["jepa", "jepa.*"]), "jepa.configs"],
    package_dir={"jepa.configs": "configs"},
    python_requires=">=3.11",  # jax, jaxlib, flax, orbax-checkpoint, grain and array-record 0.10-era releases
    install_requires=[
        f"jax{JAX}",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.10,<5",
        "array-record>=0.8.6,<0.9",
        "ml-collections>=1.1,<2",
        "absl-py>=2",
        "av>=14,<19",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "opencv-python-headless>=4.8",
    ],
    extras_require={
        # Accelerator builds of the same JAX range: pip install -e ".[cuda12]" (or cuda13, tpu).
        "cuda12": [f"jax[cuda12]{JAX}"],
        "cuda13": [f"jax[cuda13]{JAX}"],
        "tpu": [f"jax[tpu]{JAX}"],
        # `tensorboard --logdir runs` (the trainer writes event files with tensorboardX either way).
        "tensorboard": ["tensorboard>=2.16"],
        # The embedded world dataset: DeepMind Control Suite rendered by MuJoCo (mujoco 4 breaks dm-control 1.0.50).
        "dmc": ["mujoco==3.17.0", "dm-control==1.0.50"],
        "notebooks": ["nbformat>=5.9", "nbclient>=0.10", "ipykernel>=6.29", "matplotlib>=3.8"],
        # `python -m jepa.convert`: safetensors for Hugging Face folders; torch only to read or write Meta's .pt
        # files (torch.load(weights_only=True)). For a CPU-only torch, install it first from PyTorch's CPU index.
        "interop": ["safetensors>=0.4,<1", "torch>=2.6"],
        "dev": [
            "pytest>=8",
            "tensorboard>=2.16",
            "mujoco==3.17.0",
            "dm-control==1.0.50",
            "nbformat>=5.9",
            "nbclient>=0.10",
            "ipykernel>=6.29",
            "matplotlib>=3.8",
            # Parity tests against transformers' VJEPA2Model (tests/test_convert.py). torch is pinned to the CPU
            # build that pip finds on this project's machines: a range admitting a newer release pulls a
            # several-GB CUDA build.
            "torch==2.13.0",
            "transformers>=5,<6",
            "safetensors>=0.4,<1",
        ],
    },
    entry_points={
        "console_scripts": [
            "jepa-train=jepa.train:run",
            "jepa-export=jepa.export:run",
            "jepa-probe=jepa.probe:run",
            "jepa-plan=jepa.plan:run",
            "jepa-surprise=jepa.surprise:run",
            "jepa-prepare=jepa.data.prepare:run",
            "jepa-data-bench=jepa.data.bench:run_cli",
            "jepa-convert=jepa.convert:run",
            "jepa-constraints=jepa.constraints:run",
            "jepa-guard=jepa.guard:run",
        ],
    },
)
