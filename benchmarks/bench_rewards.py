"""Math reward throughput: graded answers per second through the process pool, and grading's share of a step.

Cases:
- ``eval_gold``: the gold answer of every evaluation problem (885 in ``../shared/data/math-eval``),
  written as a model would, one distinct pair each: the pool's raw grading rate.
- ``step_P{prompts}``: a training step's summaries, P prompts x G=8 traces x S=4 slots x A=4
  summaries (the paper's 64 prompts: 8192 summaries). Each summary of a prompt holds the gold
  answer (55%, as written or as an equivalent form), a wrong answer (30%, a few distinct ones),
  no box (10%) or a second ``</think>`` (5%); the reward grades only the distinct pairs.

Providers: ``pool_w{N}`` is the reward as the trainer runs it with N workers (pairs that plain
text settles, identical strings and integers, skip the pool); ``_no_shortcut`` sends every
distinct pair to math-verify. ``eval_gold`` runs without the shortcut: the pool's raw rate.
Each case runs on a fresh pool whose workers are already started, once with cold parse caches
(``cold``) and once more (``warm``: answers seen before, as the ground truths are in a long run);
times are medians over 3 fresh pools (1 with ``--quick``).
Grading's share of a step is reported against ``--step-seconds``, an assumed wall time of one
training step of the paper's setting on one GPU: no trainer step exists to measure yet.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from pathlib import Path

from common import Results, parse_args

from trainer.data import load_problems
from trainer.rewards import MathReward

EVAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "math-eval"
TRACES, SLOTS, SUMMARIES = 8, 4, 4


def completion(answer: str | None, valid_format: bool = True) -> str:
    thinking = "Some reasoning." + ("</think> again" if not valid_format else "")
    summary = "The answer follows." if answer is None else f"The answer is \\boxed{{{answer}}}."
    return thinking + "...\n\n...\n\n</think>\n\n**Final Answer**\n" + summary


def wrong(answer: str, offset: int) -> str:
    match = re.search(r"\d+", answer)
    if match is None:
        return f"{answer}+{offset}"
    return answer[: match.start()] + str(int(match.group()) + offset) + answer[match.end() :]


def equivalent(answer: str) -> str:
    return answer.replace("\\frac", "\\dfrac") if "\\frac" in answer else f"{{{answer}}}"


def step_batch(problems, num_prompts: int, rng: random.Random):
    completions, answers = [], []
    for problem in rng.sample(problems, num_prompts):
        gold = problem.answer[0]
        for _ in range(TRACES * SLOTS * SUMMARIES):
            draw = rng.random()
            if draw < 0.40:
                text = completion(gold)
            elif draw < 0.55:
                text = completion(equivalent(gold))
            elif draw < 0.85:
                text = completion(wrong(gold, rng.randint(1, 3)))
            elif draw < 0.95:
                text = completion(None)
            else:
                text = completion(gold, valid_format=False)
            completions.append(text)
            answers.append(problem.answer)
    return completions, answers


def run_case(results: Results, case: str, completions, answers, settings: tuple[int, bool], repeats: int, step_seconds):
    """Median over ``repeats`` fresh pools of the cold and the warm call."""
    num_workers, exact_shortcut = settings
    provider = f"pool_w{num_workers}" + ("" if exact_shortcut else "_no_shortcut")
    seconds = {"cold": [], "warm": []}
    for _ in range(repeats):
        with MathReward(num_workers=num_workers, timeout_s=5.0, exact_shortcut=exact_shortcut) as reward:
            reward.pool.warm_up()
            for cache in ("cold", "warm"):
                start = time.perf_counter()
                _, metrics = reward(completions, answers)
                seconds[cache].append(time.perf_counter() - start)
    pairs = metrics["reward/graded_pairs"]
    results.add(case, provider, "summaries", len(completions), "count")
    results.add(case, provider, "exact_pairs", metrics["reward/exact_pairs"], "count")
    results.add(case, provider, "pool_graded_pairs", pairs, "count")
    results.add(case, provider, "timeouts", metrics["reward/timeouts"], "count")
    results.add(case, provider, "mean_reward", metrics["reward/mean"], "score")
    for cache, samples in seconds.items():
        median = statistics.median(samples)
        results.add(case, provider, f"{cache}_seconds", median, "s")
        results.add(case, provider, f"{cache}_pool_graded_per_s", pairs / median, "1/s")
        results.add(case, provider, f"{cache}_summaries_per_s", len(completions) / median, "1/s")
        if step_seconds is not None:
            share = median / (median + step_seconds)
            results.add(case, provider, f"{cache}_share_of_{step_seconds:g}s_step", 100 * share, "%")


def main() -> None:
    def extra(parser):
        parser.add_argument("--step-seconds", type=float, default=300.0, help="assumed wall time of one training step")

    args = parse_args("rewards", __doc__, extra)
    problems = []
    for name in ("aime", "amc", "math", "minerva"):
        problems.extend(load_problems(EVAL_DIR / f"{name}.json")[0])
    rng = random.Random(0)
    results = Results("rewards", args.out)
    gold_problems = rng.sample(problems, 200) if args.quick else problems
    gold_completions = [completion(problem.answer[0]) for problem in gold_problems]
    gold_answers = [problem.answer for problem in gold_problems]
    repeats = 1 if args.quick else 3
    run_case(results, f"eval_gold_{len(gold_problems)}", gold_completions, gold_answers, (2, False), repeats, None)
    num_prompts = 16 if args.quick else 64
    completions, answers = step_batch(problems, num_prompts, rng)
    for settings in [(2, True), (2, False)] if args.quick else [(1, True), (2, True), (2, False)]:
        run_case(results, f"step_P{num_prompts}", completions, answers, settings, repeats, args.step_seconds)
    results.finish(args.out)


if __name__ == "__main__":
    main()
