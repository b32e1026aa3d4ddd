"""AnytimeReasoner (BRPO) against GRPO and the paper's ablations on the synthetic task: accuracy at
every budget, anytime score, and the variance of the thinking advantage.

One SFT warm-up, saved and evaluated once, then from that same checkpoint RL with each method and
seed (S slots, A summaries, prior, thinking baseline, summary advantages; ARCHITECTURE.md):

- `grpo`: 1, 1, base, v2only, grpo (plain final-budget GRPO);
- `ar_linear` / `ar_uniform`: 4, 2, that prior, brpo, brpo (AnytimeReasoner);
- the ablations, each GRPO plus ingredients: `grpo_linear` (the linear prior: 4, 1, linear,
  v2only, grpo), `grpo_decouple` (decoupled summaries: 4, 2, base, v2only, brpo), `grpo_vr` (BRPO's
  baseline: 4, 1, base, brpo, grpo), `grpo_vr_decouple` (both: 4, 2, base, brpo, brpo).
A is 2 where the presets say 4, as in `make train` (the tiny task's summary is a few tokens); A is
set for every method, as the task configs set it beside their preset.

Two tasks (`--task`): `demo` is `make train`'s (`configs/tiny-cpu.yaml`, GRPO and AR only), whose
accuracy saturates at 128 tokens; `graded` (`configs/tiny-cpu-graded.yaml`, all seven methods)
spreads the essential work over the thinking, so accuracy rises budget by budget and stays below
0.8 at the largest budget after SFT.

Sampled tokens per step are matched by the number of prompts: a method that samples fewer
summaries per trace gets more prompts (G=4 and two optimizer updates per step for all). The demo
keeps its fixed 48 GRPO vs 32 AR prompts; the graded task's counts (`TASKS["graded"].prompts`) come
from the tokens per trace each kind of method sampled in its first two steps from the SFT
checkpoint. The match holds at the start: RL shortens the thinking at its own pace in each method,
and the CSV reports the measured sampled tokens per step of every run. Every run is evaluated on
the same held-out problems (256 x 4 samples) at the same budgets with uniform weights.

Outputs (in --out; `<name>` is `anytime_vs_grpo`, or `anytime_vs_grpo_graded` for the graded task):
`bench_<name>.csv` with cases `start` (provider `sft`), `seed<k>` and `mean` (providers the methods;
metrics `accuracy@<budget>`, `anytime_score`, in `mean` also `accuracy_se@<budget>` and
`anytime_score_se`, standard errors over seeds (one seed: over problems), and
`sampled_tokens_per_step`), `variance/<method>`
for the methods with BRPO's baseline (providers `brpo` and `v2only`: Var[R - V] / Var[R] of the
thinking advantage under BRPO's baseline and under the GRPO-style V2 on that method's own rollouts,
pooled: the sum of Var[R - V] over the sum of Var[R] over steps and seeds, as a mean of per-step
ratios is dominated by steps whose returns barely vary; metrics `ratio@<budget>` over all steps,
`ratio_early@<budget>` over the first quarter, `ratio_seed_se@<budget>` the standard error of the
per-seed pooled ratios) and `timing`; `<name>.png` (accuracy vs budget, a line per method with a
band of one standard error over seeds); `bench_<name>.targets.txt` (markdown tables and the claims'
verdicts).

    python benchmarks/bench_anytime_vs_grpo.py [--task demo|graded] [--quick] [--seeds 3] [--out DIR]

The RL runs go to `--workers` processes (default 2 on 2 or more cores), each with an equal share of
the torch threads, as the tiny models gain little from a second thread (`--workers 1`: one run at a
time with every thread). Full: 3 seeds, 100 RL steps (demo) or 60 (graded); --quick: 1 seed, 25 or
16 steps; the SFT warm-up is the task's full one (1500 steps) in both: a shorter one leaves a model
that computes the chain too poorly for the budgets to matter.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from common import _REPO_ROOT, Results, environment_line, parse_args
from transformers.utils import logging as hf_logging

from trainer.config import load_config
from trainer.evaluate import EvalResult, plot_curves
from trainer.loop import Trainer
from trainer.metrics import Display

# num_summaries is set for every method: the task configs set it (2) beside their preset, and a key
# beside the preset wins over the preset's own, so `method.preset=grpo` alone would keep A=2.
SWITCHES = {
    "grpo": ["method.preset=grpo", "method.num_summaries=1"],
    "ar_linear": ["method.preset=ar_linear", "method.num_summaries=2"],
    "ar_uniform": ["method.preset=ar_uniform", "method.num_summaries=2"],
    "grpo_linear": ["method.preset=grpo_linear", "method.num_summaries=1"],
    "grpo_decouple": ["method.preset=grpo_decouple", "method.num_summaries=2"],
    "grpo_vr": ["method.preset=grpo_vr", "method.num_summaries=1"],
    "grpo_vr_decouple": ["method.preset=grpo_vr_decouple", "method.num_summaries=2"],
}
ESTIMATORS = ("brpo", "v2only")


@dataclass(frozen=True)
class Task:
    config: Path
    budgets: tuple[int, ...]
    # Prompts per step of each method (two PPO mini-batches of half as many): the token matching.
    prompts: dict[str, int]
    rl_steps: int
    quick_rl_steps: int
    sft_steps: int
    # Methods whose thinking baseline is BRPO's: their rollouts give the variance ratio.
    variance_methods: tuple[str, ...]
    name: str


TASKS = {
    "demo": Task(
        config=_REPO_ROOT / "configs" / "tiny-cpu.yaml",
        budgets=(32, 64, 96, 128),
        prompts={"grpo": 48, "ar_linear": 32, "ar_uniform": 32},
        rl_steps=100,
        quick_rl_steps=25,
        sft_steps=1500,
        variance_methods=("ar_linear",),
        name="anytime_vs_grpo",
    ),
    "graded": Task(
        config=_REPO_ROOT / "configs" / "tiny-cpu-graded.yaml",
        budgets=(32, 64, 96, 128),
        # Sampled tokens per trace at the SFT checkpoint (first two RL steps): thinking 94 and
        # summaries of 6 (after closed traces) to 9 tokens, so S=4, A=2: 164; S=4, A=1: 129; GRPO: 100.
        # 32 prompts x 164 = 52 x 100 = 40 x 129 (to 2%).
        prompts={
            "grpo": 52,
            "ar_linear": 32,
            "ar_uniform": 32,
            "grpo_linear": 40,
            "grpo_decouple": 32,
            "grpo_vr": 40,
            "grpo_vr_decouple": 32,
        },
        rl_steps=60,
        quick_rl_steps=16,
        sft_steps=1500,
        variance_methods=("ar_linear", "grpo_vr", "grpo_vr_decouple"),
        name="anytime_vs_grpo_graded",
    ),
}
QUIET = ["logging.progress=false", "logging.tensorboard=false"]


def extra_arguments(parser) -> None:
    parser.add_argument("--task", choices=tuple(TASKS), default="demo", help="demo (make train's task) or graded")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the task's)")
    parser.add_argument("--sft-steps", type=int, default=None, help="SFT warm-up steps (default: the task's)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the task's methods")
    parser.add_argument("--workers", type=int, default=None, help="runs at a time (default: 2 on 2+ cores)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (repeatable), e.g. eval.num_problems=64")  # fmt: skip


def metric_rows(run_dir: Path) -> list[dict]:
    """A run's RL-step metric rows in order, numbered from 0 (``step_index``; SFT rows have no train/loss)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{**row, "step_index": i} for i, row in enumerate(row for row in rows if "train/loss" in row)]


def pooled_ratio(rows: list[dict], estimator: str, budget: int) -> float | None:
    """Var[R - V] / Var[R] pooled over steps: the sum of the advantage variances over the sum of the
    return variances (a mean of per-step ratios is dominated by steps whose returns barely vary)."""
    numerator = sum(row.get(f"advantages/advantage_variance/{estimator}@{budget}", 0.0) for row in rows)
    denominator = sum(row.get(f"advantages/return_variance@{budget}", 0.0) for row in rows)
    return numerator / denominator if denominator > 0 else None


def standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def run_method(config_path: str, overrides: list[str], run_dir: str, checkpoint: str, threads: int) -> str:
    """One RL run from the SFT checkpoint (in a worker process) -> the run folder."""
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # loading the checkpoint: the parent's bar counts the runs
    trainer = Trainer(load_config(config_path, overrides), run_dir, resume=checkpoint)
    trainer.run(evaluate_start=False)
    return run_dir


def main() -> None:
    args = parse_args("anytime_vs_grpo", __doc__, extra_arguments)
    if args.device != "cpu":
        print("this comparison is sized for the CPU demo; running it on the CPU")
    task = TASKS[args.task]
    methods = list(task.prompts) if args.methods is None else args.methods.split(",")
    unknown = [method for method in methods if method not in task.prompts]
    if unknown:
        raise SystemExit(
            f"--methods {unknown} are not methods of the {args.task} task; expected some of {list(task.prompts)}"
        )
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    rl_steps = args.steps or (task.quick_rl_steps if args.quick else task.rl_steps)
    sft_steps = args.sft_steps or task.sft_steps
    workers = args.workers or min(2, os.cpu_count() or 1)
    cores = os.cpu_count() or 1
    print(environment_line("cpu"), f"| {workers} worker(s) x {max(1, cores // workers)} thread(s)")
    common = [*QUIET, f"eval.budgets={list(task.budgets)}", *args.overrides]
    budgets = load_config(task.config, common).eval.budgets  # the task's, unless --set moves them
    work = args.out / task.name
    results = Results(task.name, args.out)
    started = time.perf_counter()

    sft_overrides = [*common, f"sft.steps={sft_steps}", "train.steps=0", "logging.progress=true"]  # its bar
    sft = Trainer(load_config(task.config, sft_overrides), work / "sft")
    sft._sft(sft_steps)
    checkpoint = sft.save("sft", 0)
    curves = {"sft": sft.evaluate("sft", step=0)}
    sft.metrics.close()
    add_eval_rows(results, "start", "sft", curves["sft"])
    sft_seconds = time.perf_counter() - started

    jobs = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for seed in seeds:
            for method in methods:
                prompts = task.prompts[method]
                overrides = [*common, *SWITCHES[method], f"train.prompts_per_step={prompts}",
                             f"train.ppo_mini_batch_prompts={prompts // 2}", f"train.steps={rl_steps}",
                             f"train.seed={seed}", "sft.steps=0"]  # fmt: skip
                run_dir = work / f"{method}_seed{seed}"
                jobs[method, seed] = pool.submit(run_method, str(task.config), overrides, str(run_dir),
                                                 str(checkpoint), max(1, cores // workers))  # fmt: skip
        display = Display(len(jobs), f"RL runs ({rl_steps} steps + evaluation each)")
        for job in as_completed(jobs.values()):
            job.result()  # a failed run raises here, at once
            display.advance(f"{time.perf_counter() - started:.0f} s since the start")
        display.close()
        run_dirs = {key: Path(job.result()) for key, job in jobs.items()}

    finals: dict[str, list[EvalResult]] = {method: [] for method in methods}
    for (method, seed), run_dir in run_dirs.items():
        final = EvalResult.from_json(run_dir / "eval" / "final.json")
        finals[method].append(final)
        add_eval_rows(results, f"seed{seed}", method, final)
        rows = metric_rows(run_dir)
        results.add(f"seed{seed}", method, "sampled_tokens_per_step",
                    statistics.mean(row["rollout/sampled_tokens"] for row in rows), "tokens")  # fmt: skip
    for method, evaluations in finals.items():
        curves[method] = average(evaluations)
        add_eval_rows(results, "mean", method, curves[method])
        for budget in budgets:
            results.add("mean", method, f"accuracy_se@{budget}", curves[method].stderr_by_budget[budget], "accuracy")
        results.add("mean", method, "anytime_score_se", curves[method].stderr, "score")
        tokens = [results.value(f"seed{seed}", method, "sampled_tokens_per_step") for seed in seeds]
        results.add("mean", method, "sampled_tokens_per_step", statistics.mean(tokens), "tokens")
    variance_methods = [method for method in task.variance_methods if method in methods]
    variance = {}
    for method in variance_methods:
        runs = [run_dirs[method, seed] for seed in seeds]
        variance[method] = add_variance_rows(results, method, runs, budgets, rl_steps)
    total = time.perf_counter() - started
    results.add("timing", "sft", "seconds", sft_seconds, "s")
    results.add("timing", "all", "seconds", total, "s")
    title = f"{args.task} task: {len(seeds)} seed(s), {rl_steps} RL steps"
    plot_curves(curves, args.out / f"{task.name}.png", title=title)
    spread = "seeds" if len(seeds) > 1 else "problems (one seed)"
    notes = [
        f"{title}; ± is the standard error over {spread}",
        "",
        *markdown_tables(results, curves, budgets, variance_methods),
        "",
        *verdicts(curves, variance, budgets),
    ]
    results.finish(args.out, notes=[*notes, f"wall time {total:.0f} s (SFT and its evaluation {sft_seconds:.0f} s)"])


def add_eval_rows(results: Results, case: str, provider: str, result: EvalResult) -> None:
    for budget, accuracy in sorted(result.accuracy.items()):
        results.add(case, provider, f"accuracy@{budget}", accuracy, "accuracy")
    results.add(case, provider, "anytime_score", result.anytime_score, "score")


def add_variance_rows(results: Results, method: str, run_dirs: list[Path], budgets: list[int], rl_steps: int) -> dict:
    """The pooled variance ratios of one method's runs; returns ``{(estimator, budget): [per-seed ratio]}``."""
    per_seed = [metric_rows(run_dir) for run_dir in run_dirs]
    every = [row for rows in per_seed for row in rows]
    early = [row for row in every if row["step_index"] < max(1, rl_steps // 4)]
    by_seed = {}
    for estimator in ESTIMATORS:
        for budget in budgets:
            for metric, rows in ((f"ratio@{budget}", every), (f"ratio_early@{budget}", early)):
                ratio = pooled_ratio(rows, estimator, budget)
                if ratio is not None:
                    results.add(f"variance/{method}", estimator, metric, ratio, "ratio")
            seeds = [pooled_ratio(rows, estimator, budget) for rows in per_seed]
            by_seed[estimator, budget] = [ratio for ratio in seeds if ratio is not None]
            if len(by_seed[estimator, budget]) > 1:
                spread = standard_error(by_seed[estimator, budget])
                results.add(f"variance/{method}", estimator, f"ratio_seed_se@{budget}", spread, "ratio")
    return by_seed


def average(evaluations: list[EvalResult]) -> EvalResult:
    """The mean curve over seeds; its standard errors are over seeds (one problem set). One seed: its
    own evaluation, whose standard errors are over problems."""
    if len(evaluations) == 1:
        return evaluations[0]
    budgets = sorted(evaluations[0].accuracy)
    first = evaluations[0]
    return EvalResult(
        anytime_score=statistics.mean(e.anytime_score for e in evaluations),
        stderr=standard_error([e.anytime_score for e in evaluations]),
        num_problems=first.num_problems,
        samples_per_problem=first.samples_per_problem,
        accuracy={b: statistics.mean(e.accuracy[b] for e in evaluations) for b in budgets},
        stderr_by_budget={b: standard_error([e.accuracy[b] for e in evaluations]) for b in budgets},
        weights=first.weights,
        mean_thinking_tokens=statistics.mean(e.mean_thinking_tokens for e in evaluations),
        closed_share=statistics.mean(e.closed_share for e in evaluations),
        temperature=first.temperature,
    )


def markdown_tables(
    results: Results, curves: dict[str, EvalResult], budgets: list[int], variance_methods: list[str]
) -> list[str]:
    """The README's tables: accuracy per budget and anytime score (mean ± standard error over seeds),
    sampled tokens per step; then the pooled variance ratios (first quarter of the steps in brackets)."""
    header = "| method | " + " | ".join(f"acc@{b}" for b in budgets) + " | anytime score | sampled tokens/step |"
    lines = [header, "|---" * (len(budgets) + 3) + "|"]
    for name, curve in curves.items():
        cells = [f"{curve.accuracy[b]:.3f}" + ("" if name == "sft" else f" ± {curve.stderr_by_budget[b]:.3f}")
                 for b in budgets]  # fmt: skip
        score = f"{curve.anytime_score:.3f}" + ("" if name == "sft" else f" ± {curve.stderr:.3f}")
        tokens = results.value("mean", name, "sampled_tokens_per_step")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {score} | {'' if tokens is None else f'{tokens:.0f}'} |")
    rows = []
    for method in variance_methods:
        for estimator in ESTIMATORS:
            cells = []
            for budget in budgets:
                ratio = results.value(f"variance/{method}", estimator, f"ratio@{budget}")
                early = results.value(f"variance/{method}", estimator, f"ratio_early@{budget}")
                cells.append(
                    "" if ratio is None else f"{ratio:.2f} ({early:.2f})" if early is not None else f"{ratio:.2f}"
                )
            rows.append(f"| {method} | {estimator} | " + " | ".join(cells) + " |")
    if rows:
        lines += ["", "| rollouts | baseline | " + " | ".join(str(b) for b in budgets) + " |",
                  "|---" * (len(budgets) + 2) + "|", *rows]  # fmt: skip
    return lines


def verdicts(curves: dict[str, EvalResult], variance: dict[str, dict], budgets: list[int]) -> list[str]:
    """The paper's claims, each difference in standard errors (over seeds, the two methods' combined)."""
    lines = []
    if "grpo" in curves:
        grpo = curves["grpo"]
        for method in (m for m in curves if m not in ("sft", "grpo")):
            ar = curves[method]
            gaps = []
            for budget in budgets:
                difference = ar.accuracy[budget] - grpo.accuracy[budget]
                error = math.hypot(ar.stderr_by_budget[budget], grpo.stderr_by_budget[budget])
                gaps.append(
                    f"{budget}: {difference:+.3f} ({difference / error:+.1f} SE)"
                    if error > 0
                    else f"{budget}: {difference:+.3f}"
                )
            difference = ar.anytime_score - grpo.anytime_score
            error = math.hypot(ar.stderr, grpo.stderr)
            shown = f" ({difference / error:+.1f} SE)" if error > 0 else ""
            lines.append(f"{method} - grpo: anytime {difference:+.3f}{shown}; by budget {', '.join(gaps)}")
    for method, by_seed in variance.items():
        gaps = []
        for budget in budgets:
            pairs = list(zip(by_seed["v2only", budget], by_seed["brpo", budget], strict=False))
            if len(pairs) > 1:
                differences = [v2 - brpo for v2, brpo in pairs]
                mean, error = statistics.mean(differences), standard_error(differences)
                gaps.append(
                    f"{budget}: {mean:+.3f} ({mean / error:+.1f} SE)" if error > 0 else f"{budget}: {mean:+.3f}"
                )
            elif pairs:
                gaps.append(f"{budget}: {pairs[0][0] - pairs[0][1]:+.3f}")
        lines.append(f"variance ratio V2 - BRPO on {method} rollouts (per-seed pooled): {', '.join(gaps)}")
    return lines


if __name__ == "__main__":
    main()
