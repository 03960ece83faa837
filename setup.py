"""fastvit: a drop-in Vision Transformer whose hot paths are Triton kernels.

The top-level folder ``kernels/`` ships as the subpackage ``fastvit.kernels``: a top-level ``kernels``
module would shadow Hugging Face's PyPI package of that name, which transformers imports when present.
"""
from setuptools import setup

setup(
    name="fastvit",
    version="0.1.0",
    description="Drop-in, timm-compatible Vision Transformer with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastvit", "fastvit.data", "fastvit.kernels"],
    package_dir={"fastvit": "fastvit", "fastvit.kernels": "kernels"},
    package_data={"fastvit": ["pretrained_cfgs.json"]},  # timm's pretrained configs (scripts/gen_pretrained_cfgs.py)
    install_requires=["torch==2.14.1", "torchvision==0.29.1", "numpy", "tqdm", "matplotlib",
                      "scikit-learn",  # the embedded digits dataset of the default training run
                      "safetensors"],  # the trainer writes its final model as a timm Hub folder
    extras_require={
        "test": ["pytest", "pytest-xdist", "pytest-benchmark",
                 "timm>=1.0.31",  # the reference: the registry and config tests compare with timm 1.0.31's models
                 "scikit-learn", "safetensors", "transformers", "peft",
                 "onnx", "onnxruntime", "onnxscript", "huggingface_hub", "webdataset"],
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        "hub": ["huggingface_hub", "safetensors"],  # pretrained=True downloads, save_pretrained
        "flash": ["flash-attn"],
        "shards": ["webdataset"],  # --data with WebDataset .tar shards, python -m fastvit.data.shards
        "dali": ["nvidia-dali-cuda130"],  # --decode dali (NVIDIA DALI built for CUDA 13)
    },
)
