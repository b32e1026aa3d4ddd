"""What this machine has, before the GPU check spends time on it: versions, the GPU, what imports.

    python benchmarks/gpu_preflight.py OUT_DIR [--wheels .whl --target DIR]

With ``--wheels``, first installs (offline, no dependencies) every carried wheel whose
distribution is not installed already, into ``--target`` (the caller puts it on PYTHONPATH); a
wheel for something the image has is left alone, so carried wheels never shadow the image. Prints
one table and writes ``OUT_DIR/env.json``. Never fails on a missing package: a package
that does not import is listed with the reason, and the steps that need it skip themselves.
Exit status 0 always (a broken torch is reported, not raised), so the check goes on to its report.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Module name -> what needs it. The image of the GPU machine lacks some; .whl/ carries them.
PACKAGES = {
    "torch": "everything",
    "triton": "Triton kernels",
    "transformers": "tree forward, rollout",
    "tokenizers": "tiny tokenizer",
    "safetensors": "checkpoints",
    "rich": "benchmark tables",
    "pytest": "gpu tests",
    "pytest_timeout": "per-test time limits",
    "yaml": "configs",
    "numpy": "data",
    "pyarrow": "parquet data",
    "tensorboard": "training logs",
    "matplotlib": "plots",
    "pebble": "grading pool (bench_rewards)",
    "math_verify": "math rewards (bench_rewards)",
    "datasets": "hub data sets (optional)",
    "liger_kernel": "bench_logprobs anchors liger_fused_linear_grpo, liger_fused_linear_ce, liger_private_eager_helper",
    "cut_cross_entropy": "bench_logprobs anchors cce_default_*, cce_filter_off_*",
    "flash_attn": "attention backend flash_attn (optional)",
    "xformers": "attention backend xformers (optional)",
    "sglang": "SGLang engine (optional)",
    "gguf": "GGUF model loading (optional)",
}


def probe_import(name: str) -> dict:
    start = time.perf_counter()
    try:
        module = importlib.import_module(name)
    except Exception as error:  # report, never raise: the point is to list what is missing
        return {"ok": False, "error": f"{type(error).__name__}: {error}"[:200]}
    version = getattr(module, "__version__", None)
    return {"ok": True, "version": str(version) if version else "", "import_s": round(time.perf_counter() - start, 2)}


def gpu_facts() -> dict:
    facts: dict = {}
    try:
        import torch
    except Exception as error:
        return {"cuda_available": False, "error": f"torch does not import: {error}"}
    facts["torch_cuda"] = torch.version.cuda
    facts["cuda_available"] = torch.cuda.is_available()
    if facts["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        facts.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            device_count=torch.cuda.device_count(),
        )
    nvcc = shutil.which("nvcc")
    facts["nvcc"] = nvcc
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
            facts["nvcc_version"] = out.strip().splitlines()[-1] if out.strip() else ""
        except (OSError, subprocess.SubprocessError) as error:
            facts["nvcc_version"] = f"failed: {error}"
    if shutil.which("nvidia-smi"):
        try:
            facts["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            facts["nvidia_smi"] = f"failed: {error}"
    return facts


def install_missing_wheels(wheel_dir: Path, target: Path) -> dict[str, str]:
    """Install each wheel whose distribution is missing, one pip call each; {wheel: outcome}."""
    outcomes = {}
    for wheel in sorted(wheel_dir.glob("*.whl")):
        distribution = wheel.name.split("-")[0]
        try:
            outcomes[wheel.name] = f"already installed ({importlib.metadata.version(distribution)})"
            continue
        except importlib.metadata.PackageNotFoundError:
            pass
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        command += ["--disable-pip-version-check", "--upgrade", "--target", str(target), str(wheel)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        outcomes[wheel.name] = "installed" if done.returncode == 0 else f"FAILED: {done.stderr.strip()[-200:]}"
    if target.exists():
        if str(target) not in sys.path:
            sys.path.insert(0, str(target))
        # The folder may be on PYTHONPATH from before it existed: drop the cached "nothing here".
        sys.path_importer_cache.pop(str(target), None)
        importlib.invalidate_caches()
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--wheels", type=Path, help="folder of carried wheels")
    parser.add_argument("--target", type=Path, help="where to install the missing ones")
    args = parser.parse_args()
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    wheels = {}
    if args.wheels is not None and args.wheels.is_dir():
        if args.target is None:
            parser.error("--wheels needs --target")
        wheels = install_missing_wheels(args.wheels, args.target)
        for name, outcome in wheels.items():
            print(f"  wheel {name}: {outcome}")
    env = {
        "wheels": wheels,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": gpu_facts(),
        "packages": {name: probe_import(name) for name in PACKAGES},
    }
    (out_dir / "env.json").write_text(json.dumps(env, indent=2))
    print(f"python {env['python']} on {env['platform']}")
    for key, value in env["gpu"].items():
        print(f"  {key}: {value}")
    width = max(map(len, PACKAGES))
    for name, probe in env["packages"].items():
        shown = f"ok {probe['version']}" if probe["ok"] else f"MISSING ({probe['error']})"
        print(f"  {name:<{width}}  {shown:<60.60}  {PACKAGES[name]}")


if __name__ == "__main__":
    main()
