"""Plant known sampler/learner bugs one at a time in a temporary copy and report which tests catch them.

    .venv/bin/python tests/plant_bugs.py [--only NAME ...]

Each bug is a one-line edit that silently turns on-policy training into something else (a sampler
that ignores its temperature, a learner that scores at the wrong temperature, a decode that
shifts positions...). The script copies the tracked files to a temporary folder, builds the
extension there when a C++ file is edited (otherwise it copies the built one), applies one edit,
runs the named test files, and prints a table: a bug the suite misses is a hole in the suite.
It is not collected by pytest (no ``test_`` prefix); run it after changing the sampler or the tests.
"""

from __future__ import annotations

import argparse
import glob
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bug:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


BUGS = (
    Bug("sampling ignores the temperature", "trainer/rollout/embedded.py",
        "probs = torch.softmax(logits / temperatures.clamp_min(1e-6)[:, None], dim=-1)",
        "probs = torch.softmax(logits, dim=-1)", ("tests/test_sampler.py",)),
    Bug("top_p ignored", "trainer/rollout/embedded.py", "if any(r.sampling.top_p < 1 for r in requests):", "if False:",
        ("tests/test_sampler.py",)),
    Bug("min_new_tokens ignored", "trainer/rollout/embedded.py",
        "if count < request.sampling.min_new_tokens:", "if False:", ("tests/test_sampler.py",)),
    Bug("decode position ids shifted by one", "trainer/rollout/embedded.py",
        "[[rows.input_lens[row] + len(rows.outputs[row]) - 1] for row in present]",
        "[[rows.input_lens[row] + len(rows.outputs[row])] for row in present]", ("tests/test_sampler.py",)),
    Bug("left padding unmasked in batched decode", "trainer/rollout/embedded.py",
        "mask[row, width - length :] = 1", "mask[row, :] = 1", ("tests/test_sampler.py",)),
    Bug("TreePolicy.logprobs ignores its temperature", "trainer/policy.py",
        "                temperature=temperature,\n", "                temperature=1.0,\n",
        ("tests/test_policy_tree.py", "tests/test_sampler.py")),
    Bug("autocast never enabled", "trainer/policy.py", "enabled=self.autocast_dtype is not None", "enabled=False",
        ("tests/test_policy_tree.py",)),
    Bug("gradient checkpointing never enabled", "trainer/policy.py", "        if gradient_checkpointing:\n",
        "        if False:\n", ("tests/test_policy_tree.py",)),
    Bug("entropy replaced by the log-probs", "trainer/policy.py",
        "logprobs, entropy = result\n            return TokenLogprobs(positions, logprobs, entropy)",
        "logprobs, entropy = result\n            return TokenLogprobs(positions, logprobs, logprobs)",
        ("tests/test_policy_tree.py",)),
    Bug("online log-sum-exp merge drops the tile rescale", "csrc/logprobs.cpp",
        "rsum[r] = rsum[r] * old_scale + tsum[r] * tile_scale;", "rsum[r] = rsum[r] * old_scale + tsum[r];",
        ("tests/test_logprobs.py",)),
    Bug("SGLang client without a request timeout", "trainer/rollout/sglang_client.py",
        "json=body, timeout=self.timeout)", "json=body, timeout=None)", ("tests/test_rollout_sglang.py",)),
)  # fmt: skip


def tracked_copy(destination: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    for built in glob.glob(str(ROOT / "anytime_kernels" / "_C*.so")):
        shutil.copy2(built, destination / "anytime_kernels")


def plant(bug: Bug) -> tuple[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder)
        tracked_copy(copy)
        source = copy / bug.path
        text = source.read_text()
        if text.count(bug.old) != 1:
            return f"NOT PLANTED (the line is not found once in {bug.path}; update the script)", 0.0
        source.write_text(text.replace(bug.old, bug.new))
        if bug.path.startswith("csrc/"):
            built = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy,
                                   capture_output=True, text=True)  # fmt: skip
            if built.returncode != 0:
                return "NOT PLANTED (the extension did not build)", 0.0
        start = time.perf_counter()
        env = {"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin", "HOME": str(copy)}
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *bug.tests],
                             cwd=copy, capture_output=True, text=True, env=env)  # fmt: skip
        seconds = time.perf_counter() - start
        if run.returncode == 0:
            return "MISSED", seconds
        failed = [line.split(" ")[1] for line in run.stdout.splitlines() if line.startswith("FAILED ")]
        return ("caught by " + ", ".join(failed)) if failed else f"pytest exit {run.returncode}", seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="substrings of bug names to run")
    args = parser.parse_args()
    bugs = [b for b in BUGS if not args.only or any(part in b.name for part in args.only)]
    missed = 0
    for bug in bugs:
        outcome, seconds = plant(bug)
        missed += not outcome.startswith("caught")
        print(f"{bug.name:<50} {outcome} ({seconds:.0f} s)", flush=True)
    print(f"{len(bugs) - missed} of {len(bugs)} planted bugs caught")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
