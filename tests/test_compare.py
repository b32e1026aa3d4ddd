"""The graded synthetic task's budget shape, and `make compare`'s methods (benchmarks/bench_anytime_vs_grpo.py)."""

from __future__ import annotations

import csv
import itertools
import json
import sys
from pathlib import Path

import pytest
import yaml
from fixtures.rewards import LENGTH_REWARD

from trainer.budgets import ANSWER_OPENER, Delimiters
from trainer.config import load_config
from trainer.synthetic import generate_rows, synthetic_reward
from trainer.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_anytime_vs_grpo as bench  # noqa: E402

BUDGETS = (8, 16, 24, 32)  # the compare test's (b_max 32: short rollouts)
# (S, A, prior, thinking baseline, summary advantages) of each method: ARCHITECTURE.md's presets,
# with A = 2 where the paper has 4 (the tiny task's setting, as in `make train`).
PAPER = {
    "grpo": (1, 1, "base", "v2only", "grpo"),
    "ar_linear": (4, 2, "linear", "brpo", "brpo"),
    "ar_uniform": (4, 2, "uniform", "brpo", "brpo"),
    "grpo_linear": (4, 1, "linear", "v2only", "grpo"),
    "grpo_decouple": (4, 2, "base", "v2only", "brpo"),
    "grpo_vr": (4, 1, "base", "brpo", "grpo"),
    "grpo_vr_decouple": (4, 2, "base", "brpo", "brpo"),
}


def reader_accuracy(task: bench.Task, num_problems: int = 512) -> dict[int, float]:
    """Accuracy per evaluation budget of a reader that writes the teacher's traces (what the SFT
    warm-up imitates) and answers only from a trace that closed within the budget, as the SFT model
    does (its training never shows a summary after a cut): each trace is cut as the evaluation cuts
    it, the delimiter inserted, and the real verifier scores the box. Held-out generator settings."""
    s = load_config(task.config, []).data.synthetic
    rows = generate_rows(num_problems, seed=s.seed + 1, min_steps=s.min_steps, max_steps=s.max_steps,
                         modulus=s.modulus, max_operand=s.max_operand, max_multiplier=s.max_multiplier,
                         check_probs=tuple(s.check_probs))  # fmt: skip
    tokenizer = build_tokenizer()
    delimiters = Delimiters.from_tokenizer(tokenizer)
    accuracy = {}
    for budget in task.budgets:
        completions = []
        for row in rows:
            thinking = tokenizer.encode(row["solution"].partition(ANSWER_OPENER)[0], add_special_tokens=False)
            cut = min(budget, len(thinking))
            answer = row["answer"] if delimiters.closed_within(thinking, cut) else "unknown"
            text = tokenizer.decode(thinking[:cut]) + tokenizer.decode(delimiters.inserted(thinking, cut))
            completions.append(text + f"\\boxed{{{answer}}}")
        scores, _ = synthetic_reward(completions, [row["answer"] for row in rows])
        accuracy[budget] = sum(scores) / len(scores)
    return accuracy


def test_graded_task_rises_budget_by_budget_and_leaves_room_at_the_largest():
    """After the SFT warm-up the model follows the teacher's traces (measured: the config's comments);
    those traces give accuracy rising by more than 0.1 from each of 4 budgets to the next and at most
    0.8 at the largest. The demo's task (`make train`) saturates instead: 1.0 at 128 tokens."""
    task = bench.TASKS["graded"]
    config = load_config(task.config, [])
    assert config.eval.budgets == list(task.budgets) == [32, 64, 96, 128] and config.method.b_max == 128
    accuracy = list(reader_accuracy(task).values())
    assert all(later - earlier >= 0.12 for earlier, later in itertools.pairwise(accuracy)), accuracy
    assert 0.6 <= accuracy[-1] <= 0.8, accuracy
    assert reader_accuracy(bench.TASKS["demo"])[128] == 1.0


def test_pooled_variance_ratio_by_hand():
    rows = [
        {"advantages/advantage_variance/brpo@32": 0.1, "advantages/return_variance@32": 0.4},
        {"advantages/advantage_variance/brpo@32": 0.3, "advantages/return_variance@32": 0.4},
        {"advantages/advantage_variance/brpo@32": 0.0, "advantages/return_variance@32": 0.0},
    ]
    assert bench.pooled_ratio(rows, "brpo", 32) == pytest.approx(0.4 / 0.8)  # not the mean of 0.25 and 0.75 and 0/0
    assert bench.pooled_ratio(rows[2:], "brpo", 32) is None


def read_csv(path: Path) -> dict[tuple[str, str, str], float]:
    with open(path) as handle:
        return {(row["case"], row["provider"], row["metric"]): float(row["value"]) for row in csv.DictReader(handle)}


def test_graded_compare_runs_every_method_from_one_checkpoint(tmp_path, monkeypatch):
    """Every method of the graded compare, two RL steps each from one SFT checkpoint (a few SFT
    steps, a small evaluation): the paper's switches and the token-matching prompt counts reach each
    run, every run reports its accuracy per budget and sampled tokens, and the variance ratios are
    pooled from the runs with BRPO's baseline."""
    # A few SFT steps leave every answer wrong: a reward with signal for an untrained model gives the
    # returns variance (in the workers too, which inherit the path).
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["bench_anytime_vs_grpo.py", "--task", "graded", "--sft-steps", "5",
                                      "--steps", "2", "--seeds", "1", "--workers", "2", "--out", str(out),
                                      "--set", "data.synthetic.num_train=128", "--set", "eval.num_problems=4",
                                      "--set", "eval.samples_per_problem=1", "--set",
                                      "rollout.reward=length_reward:reward", "--set", "method.b_max=32", "--set",
                                      "eval.budgets=[8,16,24,32]", "--set", "rollout.summary_max_new_tokens=4",
                                      "--set", "rollout.group_size=2", "--set", "data.synthetic.max_steps=4"])  # fmt: skip
    bench.main()
    task = bench.TASKS["graded"]
    assert set(task.prompts) == set(PAPER) and set(task.variance_methods) == {
        "ar_linear",
        "grpo_vr",
        "grpo_vr_decouple",
    }
    values = read_csv(out / "bench_anytime_vs_grpo_graded.csv")
    work = out / "anytime_vs_grpo_graded"
    for method, (slots, summaries, prior, baseline, summary_method) in PAPER.items():
        run_dir = work / f"{method}_seed0"
        config = yaml.safe_load((run_dir / "run_config.yaml").read_text())
        m, t = config["method"], config["train"]
        assert (m["num_slots"], m["num_summaries"], m["prior"]) == (slots, summaries, prior), method
        assert (m["variance_reduction"], m["summary_method"]) == (baseline, summary_method), method
        assert (t["prompts_per_step"], t["ppo_mini_batch_prompts"]) == (task.prompts[method], task.prompts[method] // 2)
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [row for row in steps if "train/loss" in row]
        assert [row["step"] for row in steps] == [1, 2]
        tokens = sum(row["rollout/sampled_tokens"] for row in steps) / 2
        assert values["seed0", method, "sampled_tokens_per_step"] == pytest.approx(tokens)
        final = json.loads((run_dir / "eval" / "final.json").read_text())
        for budget in BUDGETS:
            assert values["seed0", method, f"accuracy@{budget}"] == pytest.approx(final["accuracy"][str(budget)])
            assert values["mean", method, f"accuracy@{budget}"] == pytest.approx(final["accuracy"][str(budget)])
            # One seed: the standard error is the evaluation's own, over problems.
            assert values["mean", method, f"accuracy_se@{budget}"] == pytest.approx(
                final["stderr_by_budget"][str(budget)]
            )
    for method in PAPER:
        has_rows = any(case == f"variance/{method}" for case, _, _ in values)
        assert has_rows == (method in task.variance_methods), method
    rows = bench.metric_rows(work / "ar_linear_seed0")
    for budget in BUDGETS:
        numerator = sum(row[f"advantages/advantage_variance/v2only@{budget}"] for row in rows)
        denominator = sum(row[f"advantages/return_variance@{budget}"] for row in rows)
        assert denominator > 0
        assert values["variance/ar_linear", "v2only", f"ratio@{budget}"] == pytest.approx(numerator / denominator)
        # The first quarter of two steps is the first step.
        early = (
            rows[0][f"advantages/advantage_variance/v2only@{budget}"] / rows[0][f"advantages/return_variance@{budget}"]
        )
        assert values["variance/ar_linear", "v2only", f"ratio_early@{budget}"] == pytest.approx(early)
    notes = (out / "bench_anytime_vs_grpo_graded.targets.txt").read_text()
    assert all(f"| {method} |" in notes for method in PAPER)
    assert (out / "anytime_vs_grpo_graded.png").stat().st_size > 0
