"""jepa: V-JEPA 2 world-model pretraining in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="jepa",
    version="0.1.0",
    description="V-JEPA 2 video world-model pretraining, probing and planning in JAX/Flax",
    packages=find_packages(include=["jepa", "jepa.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",
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
        # The embedded world dataset: DeepMind Control Suite rendered by MuJoCo (mujoco 4 breaks dm-control 1.0.50).
        "dmc": ["mujoco==3.17.0", "dm-control==1.0.50"],
        "notebooks": ["nbformat>=5.9", "nbclient>=0.10", "ipykernel>=6.29", "matplotlib>=3.8"],
        "dev": [
            "pytest>=8",
            "mujoco==3.17.0",
            "dm-control==1.0.50",
            "nbformat>=5.9",
            "nbclient>=0.10",
            "ipykernel>=6.29",
            "matplotlib>=3.8",
        ],
    },
)
