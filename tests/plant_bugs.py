"""Plant known sampler/trainer bugs one at a time in a temporary copy and report which tests catch them.

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


TRAINER_TESTS = ("tests/test_reference_step.py",)
BUGS = (
    Bug("sampling ignores the temperature", "trainer/rollout/sampling.py",
        "scaled = logits / temperature[:, None]", "scaled = logits", ("tests/test_sampler.py",)),
    Bug("top_p ignored", "trainer/rollout/sampling.py", "    if nucleus:\n", "    if False:\n",
        ("tests/test_sampler.py",)),
    Bug("min_new_tokens ignored", "trainer/rollout/sampling.py",
        "blocked = (generated < rows.min_new_tokens)[:, None] & rows.stop_valid",
        "blocked = rows.stop_valid & False", ("tests/test_sampler.py",)),
    Bug("decode position ids shifted by one", "trainer/rollout/paged_runner.py",
        "state.tokens[:, None], state.positions[:, None], batch",
        "state.tokens[:, None], state.positions[:, None] + 1, batch", ("tests/test_sampler.py",)),
    Bug("left padding unmasked in batched decode", "trainer/rollout/paged_runner.py",
        "seq_lens = torch.where(live, state.positions + 1, 0)",
        "seq_lens = torch.where(live, state.positions + 2, 0)", ("tests/test_sampler.py",)),
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
    Bug("SGLang client without a request timeout", "trainer/rollout/sglang_info.py",
        "json=body, timeout=timeout)", "json=body, timeout=None)", ("tests/test_rollout_sglang.py",)),
    # The trainer's (issue 30): each is caught by the reference step, SFT or evaluation written apart
    # from the trainer (tests/reference_step.py), or by the config's table of bounds.
    Bug("seq-mean-token-mean averages over traces", "trainer/loss.py",
        "return 1.0 / (num_sequences * lengths[inverse].float())",
        "return 1.0 / (num_traces * lengths[inverse].float())", TRAINER_TESTS),
    Bug("KL term detached", "trainer/loss.py", "kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)",
        "kl = kl_penalty(logprobs.detach(), ref_logprobs, kl_estimator)", TRAINER_TESTS),
    Bug("gradient-norm clipping skipped", "trainer/learner.py",
        'max_norm = self.grad_clip if self.grad_clip is not None else float("inf")', 'max_norm = float("inf")',
        TRAINER_TESTS),
    Bug("non-finite check needs both loss and gradient", "trainer/learner.py",
        "if math.isfinite(loss_value) and math.isfinite(norm_value):",
        "if math.isfinite(loss_value) or math.isfinite(norm_value):", TRAINER_TESTS),
    Bug("ppo_epochs ignored", "trainer/learner.py", "        for _ in range(epochs):\n",
        "        for _ in range(1):\n", TRAINER_TESTS),
    Bug("KL reference log-probs from the trained policy", "trainer/learner.py",
        "batch.ref_logprobs = self._positions_logprobs(self.reference, batch)",
        "batch.ref_logprobs = self._positions_logprobs(self.policy, batch)", TRAINER_TESTS),
    Bug("token-sum-norm divisor counts the step's traces", "trainer/learner.py",
        "batch.lineage_ids[trained], len(rows), self.norm_length",
        "batch.lineage_ids[trained], batch.layout.num_traces, self.norm_length", TRAINER_TESTS),
    Bug("answer header matched anywhere in a piece", "trainer/rewards/answer.py",
        "if piece.startswith(ANSWER_STEP_HEADER):", "if ANSWER_STEP_HEADER in piece:",
        ("tests/test_rewards.py", *TRAINER_TESTS)),
    Bug("advantage aligned to the token, not the position that predicts it", "trainer/batches.py",
        'token_advantages(layout, thinking_adv, summary_adv, align="predicting")',
        "token_advantages(layout, thinking_adv, summary_adv)", TRAINER_TESTS),
    Bug("summary tokens get their slot's thinking advantage", "trainer/batches.py",
        'token_advantages(layout, thinking_adv, summary_adv, align="predicting")',
        'token_advantages(layout, thinking_adv, thinking_adv[:, :, None].expand_as(summary_adv).contiguous(), '
        'align="predicting")', TRAINER_TESTS),
    Bug("evaluation standard error divided by n", "trainer/evaluate.py",
        "values.std(unbiased=True) / math.sqrt(count)", "values.std(unbiased=True) / count", TRAINER_TESTS),
    Bug("evaluation samples grouped sample-major", "trainer/evaluate.py",
        "per_problem.view(len(prompt_ids), samples_per_problem, -1).mean(dim=1)",
        "per_problem.view(samples_per_problem, len(prompt_ids), -1).mean(dim=0)", TRAINER_TESTS),
    Bug("evaluation weighs budgets by the training prior", "trainer/loop.py",
        "c.eval.budgets or p.schedule.budgets, c.eval.prior)", "c.eval.budgets or p.schedule.budgets, c.method.prior)",
        TRAINER_TESTS),
    Bug("SFT trains the prompt tokens", "trainer/sft.py",
        "    prompts = [prompt for prompt, _ in batch]\n    solutions = [solution for _, solution in batch]\n",
        "    prompts = [prompt[:1] for prompt, _ in batch]\n"
        "    solutions = [prompt[1:] + solution for prompt, solution in batch]\n", TRAINER_TESTS),
    Bug("a negative clip epsilon accepted", "trainer/config.py", '"loss.clip_low": (lambda eps: 0 < eps < 1,',
        '"loss.clip_low": (lambda eps: eps < 1,', ("tests/test_config.py",)),
    Bug("ppo_epochs = 0 accepted", "trainer/config.py", '"train.ppo_epochs": (_at_least(1),',
        '"train.ppo_epochs": (_at_least(0),', ("tests/test_config.py",)),
)  # fmt: skip


def tracked_copy(destination: Path) -> None:
    # Tracked files and new ones not yet committed (not the ignored: venvs, builds).
    listing = ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"]
    files = [
        name
        for name in subprocess.run(listing, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
        if name and (ROOT / name).is_file()  # a tracked file deleted in the working tree is left out
    ]
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
