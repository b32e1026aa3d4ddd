"""AnytimeReasoner (BRPO) against GRPO on the synthetic task: accuracy at every budget, anytime score.

The paper's claim, on the tiny CPU setup of `make train` (`configs/tiny-cpu.yaml`): one SFT warm-up,
saved and evaluated once, then from that same checkpoint RL with each method and seed:

- `grpo`: S=1, A=1, prior base, v2only baseline, grpo summaries (plain final-budget GRPO);
- `ar_linear` / `ar_uniform`: S=4, A=2, that prior, BRPO baseline, BRPO summaries.

Matched sampled tokens: an AR trace also samples S*A short summaries, so GRPO draws 1.5x the
prompts per step (48 vs 32, G=4 both, two optimizer updates per step both); the CSV reports the
measured sampled tokens per step of every run. Every run is evaluated at the same budgets
(32/64/96/128, uniform weights) on the same 256 held-out problems x 4 samples.

Outputs (in --out): `bench_anytime_vs_grpo.csv` (providers `grpo`, `ar_linear`, `ar_uniform`;
cases `seed<k>` and `mean`; metrics `accuracy@<budget>`, `anytime_score`, `anytime_score_se`
(mean case: standard error over seeds), `sampled_tokens_per_step`; provider `sft` for the start;
and case `variance_ratio`, providers `brpo` and `v2only`, metrics `ratio@<budget>`: Var[R - V] /
Var[R] of the thinking advantage under BRPO's baseline vs the GRPO-style V2 baseline on the same
AR-linear rollouts, pooled over steps and seeds: the sum of Var[R - V] over the sum of Var[R], as a
mean of per-step ratios is dominated by steps whose returns barely vary; `ratio_early@<budget>`, the
same over the first quarter of the steps, before accuracy saturates at the larger budgets) and
`anytime_vs_grpo.png` (accuracy vs budget,
a line per method with a band of one standard error over seeds).

    python benchmarks/bench_anytime_vs_grpo.py [--quick] [--seeds 3] [--out DIR]     # make compare

Full: 3 seeds x 100 RL steps (43 minutes on 2 cores, with other work beside it); --quick: 1 seed x 25 steps (under 10
minutes). The SFT warm-up is the demo's (1500 steps) in both: a shorter one leaves a model that
computes the chain too poorly for the budgets to matter.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from common import _REPO_ROOT, Results, environment_line, parse_args

from trainer.config import load_config
from trainer.evaluate import EvalResult, plot_curves
from trainer.loop import Trainer

CONFIG = _REPO_ROOT / "configs" / "tiny-cpu.yaml"
BUDGETS = [32, 64, 96, 128]
METHODS = {
    "grpo": ["method.preset=grpo", "train.prompts_per_step=48", "train.ppo_mini_batch_prompts=24"],
    "ar_linear": ["method.preset=ar_linear", "method.num_summaries=2"],
    "ar_uniform": ["method.preset=ar_uniform", "method.num_summaries=2"],
}
COMMON = [f"eval.budgets={BUDGETS}", "logging.progress=false", "logging.tensorboard=false"]


def extra_arguments(parser) -> None:
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3; quick 1)")


def mean_of(run_dir: Path, prefix: str) -> dict[str, float]:
    """Mean over a run's RL steps of every metric whose name starts with ``prefix``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "train/loss" in row]
    keys = {key for row in rows for key in row if key.startswith(prefix)}
    return {key: statistics.mean(row[key] for row in rows if row.get(key) is not None) for key in keys}


def step_rows(run_dir: Path, steps: int) -> list[dict]:
    """A run's RL-step metric rows, numbered from 0 (SFT rows have no train/loss)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "train/loss" in row][-steps:]
    return [{**row, "step_index": i} for i, row in enumerate(rows)]


def pooled_ratio(rows: list[dict], estimator: str, budget: int) -> float | None:
    """Var[R - V] / Var[R] pooled over steps: the sum of the advantage variances over the sum of the
    return variances (a mean of per-step ratios is dominated by steps whose returns barely vary)."""
    numerator = sum(row.get(f"advantages/advantage_variance/{estimator}@{budget}", 0.0) for row in rows)
    denominator = sum(row.get(f"advantages/return_variance@{budget}", 0.0) for row in rows)
    return numerator / denominator if denominator > 0 else None


def main() -> None:
    args = parse_args("anytime_vs_grpo", __doc__, extra_arguments)
    if args.device != "cpu":
        print("this comparison is sized for the CPU demo; running it on the CPU")
    print(environment_line("cpu"))
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    rl_steps, sft_steps = (25, 1500) if args.quick else (100, 1500)
    work = args.out / "anytime_vs_grpo"
    results = Results("anytime_vs_grpo", args.out)

    sft = Trainer(load_config(CONFIG, [*COMMON, f"sft.steps={sft_steps}", "train.steps=0"]), work / "sft")
    sft._sft(sft_steps)
    checkpoint = sft.save("sft", 0)
    curves = {"sft": sft.evaluate("sft", step=0)}
    sft.metrics.close()
    add_eval_rows(results, "start", "sft", curves["sft"])

    finals: dict[str, list[EvalResult]] = {method: [] for method in METHODS}
    variance_rows: list[dict] = []  # AR-linear steps of every seed, with their step number
    for seed in seeds:
        for method, switches in METHODS.items():
            overrides = [*COMMON, *switches, f"train.steps={rl_steps}", f"train.seed={seed}", "sft.steps=0"]
            run_dir = work / f"{method}_seed{seed}"
            trainer = Trainer(load_config(CONFIG, overrides), run_dir, resume=checkpoint)
            final = trainer.run(evaluate_start=False)["final"]
            finals[method].append(final)
            add_eval_rows(results, f"seed{seed}", method, final)
            sampled = mean_of(run_dir, "rollout/sampled_tokens")["rollout/sampled_tokens"]
            results.add(f"seed{seed}", method, "sampled_tokens_per_step", sampled, "tokens")
            if method == "ar_linear":
                variance_rows.extend(step_rows(run_dir, rl_steps))
    for method, evaluations in finals.items():
        mean = average(evaluations)
        curves[method] = mean
        add_eval_rows(results, "mean", method, mean)
        scores = [e.anytime_score for e in evaluations]
        spread = statistics.stdev(scores) / math.sqrt(len(scores)) if len(scores) > 1 else float("nan")
        results.add("mean", method, "anytime_score_se", spread, "score")
    early = [row for row in variance_rows if row["step_index"] < rl_steps // 4]
    for estimator in ("brpo", "v2only"):
        for budget in BUDGETS:
            for metric, rows in ((f"ratio@{budget}", variance_rows), (f"ratio_early@{budget}", early)):
                ratio = pooled_ratio(rows, estimator, budget)
                if ratio is not None:
                    results.add("variance_ratio", estimator, metric, ratio, "ratio")
    plot_curves(curves, args.out / "anytime_vs_grpo.png", title=f"AR vs GRPO ({len(seeds)} seeds, {rl_steps} steps)")
    results.finish(args.out, notes=verdicts(curves))


def add_eval_rows(results: Results, case: str, provider: str, result: EvalResult) -> None:
    for budget, accuracy in sorted(result.accuracy.items()):
        results.add(case, provider, f"accuracy@{budget}", accuracy, "accuracy")
    results.add(case, provider, "anytime_score", result.anytime_score, "score")


def average(evaluations: list[EvalResult]) -> EvalResult:
    """The mean curve over seeds; its standard errors are over seeds (one problem set)."""

    def spread(values):
        return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else evaluations[0].stderr

    budgets = sorted(evaluations[0].accuracy)
    first = evaluations[0]
    return EvalResult(
        anytime_score=statistics.mean(e.anytime_score for e in evaluations),
        stderr=spread([e.anytime_score for e in evaluations]),
        num_problems=first.num_problems,
        samples_per_problem=first.samples_per_problem,
        accuracy={b: statistics.mean(e.accuracy[b] for e in evaluations) for b in budgets},
        stderr_by_budget={b: spread([e.accuracy[b] for e in evaluations]) for b in budgets},
        weights=first.weights,
        mean_thinking_tokens=statistics.mean(e.mean_thinking_tokens for e in evaluations),
        closed_share=statistics.mean(e.closed_share for e in evaluations),
        temperature=first.temperature,
    )


def verdicts(curves: dict[str, EvalResult]) -> list[str]:
    grpo = curves["grpo"]
    lines = []
    for method in ("ar_linear", "ar_uniform"):
        ar = curves[method]
        above = [b for b in ar.accuracy if ar.accuracy[b] > grpo.accuracy[b]]
        lines.append(
            f"{method}: anytime {ar.anytime_score:.3f} vs grpo {grpo.anytime_score:.3f} "
            f"({ar.anytime_score - grpo.anytime_score:+.3f}); above grpo at budgets {above} of {sorted(ar.accuracy)}"
        )
    return lines


if __name__ == "__main__":
    main()
