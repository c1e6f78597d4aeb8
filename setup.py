"""d2v-engine: data2vec pretraining engine.

Builds the optional CUDA extension in csrc/ only where nvcc and a CUDA build of torch exist;
everywhere else it installs pure Python and the kernels fall back to Triton / PyTorch.
"""
import os
import shutil

from setuptools import find_packages, setup


def _cuda_extensions():
    if os.environ.get("D2V_NO_CUDA_EXT") == "1" or shutil.which("nvcc") is None:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None:
        return [], {}
    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".cu", ".cpp"))
    )
    if not sources:
        return [], {}
    ext = CUDAExtension(
        name="d2v_cuda",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="d2v-engine",
    version="0.1.0",
    description="Fast data2vec self-supervised pretraining for speech, vision and text",
    # Import names of our own only (a generic `kernels` shadowed Hugging Face's `kernels`, which
    # transformers imports): benchmarks/, tests/ and scripts/ run from the checkout, not installed.
    packages=find_packages(include=["d2v_engine", "d2v_engine.*", "d2v_kernels", "d2v_kernels.*"]),
    entry_points={"console_scripts": [
        "d2v-train=d2v_engine.cli.train:main",
        "d2v-prepare=d2v_engine.cli.prepare:main",
        "d2v-export=d2v_engine.cli.export:main",
        "d2v-probe=d2v_engine.cli.probe:main",
        "d2v-checkpoint=d2v_engine.cli.checkpoint:main",
    ]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4", "triton>=3.0; platform_system == 'Linux'", "numpy", "pyyaml", "pillow",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "kernels"],  # kernels: Hugging Face's (tests/test_install.py)
        "dali": ["nvidia-dali-cuda130"],
        # export, init_from, tokenization; accelerate: transformers' Trainer needs it to fine-tune
        "hf": ["transformers", "safetensors", "tokenizers>=0.15.1", "accelerate"],
        "audio": ["soundfile"],  # FLAC and non-16-bit WAV in d2v-prepare and the loader
        "text": ["tokenizers>=0.15.1"],  # d2v-prepare text (encode_special_tokens)
        "tensorboard": ["tensorboard"],  # run.tensorboard: event files in <run dir>/tensorboard
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
