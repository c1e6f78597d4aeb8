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
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "benchmarks"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4", "triton>=3.0; platform_system == 'Linux'", "numpy", "pyyaml", "pillow",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark"],
        "dali": ["nvidia-dali-cuda130"],
        # export, init_from, tokenization; accelerate: transformers' Trainer needs it to fine-tune
        "hf": ["transformers", "safetensors", "tokenizers>=0.15.1", "accelerate"],
        "audio": ["soundfile"],  # FLAC and non-16-bit WAV in engine.prepare and the loader
        "text": ["tokenizers>=0.15.1"],  # engine.prepare text (encode_special_tokens)
        "tensorboard": ["tensorboard"],  # run.tensorboard: event files in <run dir>/tensorboard
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
