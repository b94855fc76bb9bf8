"""Install: `pip install torch==2.14.1 torchvision==0.29.1 -e ".[test]"` (see README.md).

torch is pinned in the install command rather than here: the GPU machines ship their own torch (2.11 with triton
3.6) and the package must import on both.
"""
from setuptools import setup

setup(
    name="pafm",
    version="0.1.0",
    description="Posterior-Augmented Flow Matching: fused Triton posterior-velocity kernels, SiT/MMDiT, FSDP2 trainer",
    python_requires=">=3.10",
    packages=["pafm", "pafm.models", "pafm.data", "pafm_kernels"],
    package_dir={"pafm_kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "timm>=1.0",
        "safetensors>=0.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
        "scikit-learn>=1.3",  # the embedded digits dataset and its evaluation classifier
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark", "scipy", "torch-fidelity", "diffusers", "transformers", "faiss-cpu",
                 "matplotlib", "wandb"],
        "eval": ["torch-fidelity", "scipy"],
        "prep": ["diffusers", "transformers", "faiss-cpu"],  # faiss: neighbours of groups too large for exact search
        "wandb": ["wandb"],  # log.wandb
    },
)
