"""Anytime evaluation: accuracy at every thinking budget, the anytime score, and their plots.

Per problem, ``samples_per_problem`` thinking traces are sampled once up to the largest budget at
the eval temperature, cut at every budget, and one summary per (trace, budget) is sampled from
the cut; the reward rule scores it. Budgets whose cut is the same (a trace that closed its
thinking before them) share their summaries, as the authors' evaluation does: the score of each is
the mean over all summaries of that cut. Accuracy at budget b is the mean score; the anytime score
is ``sum_b w_b * accuracy(b)`` (weights from the eval prior). Standard errors are over problems
(the samples of one problem are averaged first).

CLI (``anytime-eval``)::

    anytime-eval runs/demo/checkpoints/final --out runs/demo/eval --name final
    anytime-eval --compare runs/a/eval/final.json runs/b/eval/final.json --out cmp
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trainer.batches import score_rollouts
from trainer.budgets import BudgetSchedule
from trainer.checkpoint import write_text_atomic
from trainer.rollout import RolloutEngine, SamplingParams


@dataclass
class EvalResult:
    """One evaluation. ``accuracy``/``stderr_by_budget`` map budget -> value (JSON keys are strings)."""

    anytime_score: float
    stderr: float
    num_problems: int
    samples_per_problem: int
    accuracy: dict[int, float]
    stderr_by_budget: dict[int, float]
    weights: dict[int, float]
    mean_thinking_tokens: float
    closed_share: float
    temperature: float
    # A mean over evaluation sets: each set's anytime score (None: one set).
    sets: dict[str, float] | None = None

    def to_json(self, path: str | Path) -> Path:
        data = asdict(self)
        for key in ("accuracy", "stderr_by_budget", "weights"):
            data[key] = {str(budget): value for budget, value in data[key].items()}
        return write_text_atomic(path, json.dumps(data, indent=2) + "\n")  # read back by a resumed run

    @classmethod
    def from_json(cls, path: str | Path) -> EvalResult:
        data = json.loads(Path(path).read_text())
        for key in ("accuracy", "stderr_by_budget", "weights"):
            data[key] = {int(budget): float(value) for budget, value in data[key].items()}
        return cls(**data)


def _stderr(values: torch.Tensor) -> float:
    count = values.numel()
    return float(values.std(unbiased=True) / math.sqrt(count)) if count > 1 else float("nan")


@dataclass
class EvalSamples:
    """What :func:`evaluate` samples and scores for some problems, before the statistics.

    Attributes:
        per_problem: ``[P, S]`` float64 score per problem and budget, averaged over its samples.
        thinking_lens: ``[P * K]`` thinking tokens of every trace.
        finish: ``[P * K]`` how every trace ended.
    """

    per_problem: torch.Tensor
    thinking_lens: list[int]
    finish: list[str]


@torch.no_grad()
def evaluate_samples(
    engine: RolloutEngine,
    prompt_ids: Sequence[Sequence[int]],
    answers: Sequence[object],
    tokenizer,
    reward: Callable,
    *,
    schedule: BudgetSchedule,
    temperature: float,
    samples_per_problem: int,
    summary_max_new_tokens: int,
    eos_token_ids: Sequence[int],
    seed: int,
    window: int = 0,
) -> EvalSamples:
    """Sample and score ``samples_per_problem`` traces per problem and one summary per (trace, budget).

    ``window``: problems thinking at once (0: all), as ``RolloutEngine.rollout`` streams a training
    step; an engine that keeps traces for their forks then holds about two windows of them.
    """
    sampling = SamplingParams(temperature=temperature, seed=seed)
    traces, rollouts = engine.rollout(prompt_ids, samples_per_problem, schedule.b_max, schedule, 1, sampling,
                                      summary_max_new_tokens, window=window)  # fmt: skip
    trace_answers = [answers[n // samples_per_problem] for n in range(traces.num_traces)]
    scored = score_rollouts(
        rollouts,
        trace_answers,
        tokenizer,
        reward,
        think_end_id=engine.delimiters.think_end_id,
        eos_token_ids=eos_token_ids,
        group_size=samples_per_problem,
    )
    per_problem = pooled_cut_scores(scored.scores[:, :, 0].double(), rollouts.cut_lens)
    # [P, K, S]: problems, samples, budgets; averaged over samples first.
    per_problem = per_problem.view(len(prompt_ids), samples_per_problem, -1).mean(dim=1)
    return EvalSamples(per_problem, traces.thinking_lens, list(traces.finish))


def pooled_cut_scores(scores: torch.Tensor, cut_lens: torch.Tensor) -> torch.Tensor:
    """``[N, S]`` the score of every (trace, budget) as the mean over the summaries of its cut.

    Args:
        scores: ``[N, S]`` one summary's score per trace and budget slot.
        cut_lens: ``[N, S]`` the thinking each slot keeps; slots of one trace with equal cuts share
            one thinking prefix, and each gets the mean of their scores.
    """
    same_cut = (cut_lens[:, :, None] == cut_lens[:, None, :]).to(scores.dtype)  # [N, S, S]
    return (same_cut * scores[:, None, :]).sum(dim=-1) / same_cut.sum(dim=-1)


def eval_result(
    parts: Sequence[EvalSamples], schedule: BudgetSchedule, samples_per_problem: int, temperature: float
) -> EvalResult:
    """The statistics of ``parts`` taken together (problem shares of several ranks, in order)."""
    per_problem = torch.cat([part.per_problem for part in parts])
    weights = schedule.probs
    anytime = per_problem @ weights
    lengths = torch.tensor([n for part in parts for n in part.thinking_lens], dtype=torch.float64)
    finish = [f for part in parts for f in part.finish]
    return EvalResult(
        anytime_score=float(anytime.mean()),
        stderr=_stderr(anytime),
        num_problems=per_problem.shape[0],
        samples_per_problem=samples_per_problem,
        accuracy={b: float(per_problem[:, s].mean()) for s, b in enumerate(schedule.budgets)},
        stderr_by_budget={b: _stderr(per_problem[:, s]) for s, b in enumerate(schedule.budgets)},
        weights={b: float(w) for b, w in zip(schedule.budgets, weights.tolist(), strict=True)},
        mean_thinking_tokens=float(lengths.mean()),
        closed_share=sum(f == "think_end" for f in finish) / max(len(finish), 1),
        temperature=temperature,
    )


def evaluate(
    engine: RolloutEngine,
    prompt_ids: Sequence[Sequence[int]],
    answers: Sequence[object],
    tokenizer,
    reward: Callable,
    *,
    budgets: Sequence[int],
    prior: str | Sequence[float] = "uniform",
    temperature: float = 0.6,
    samples_per_problem: int = 4,
    summary_max_new_tokens: int = 118,
    eos_token_ids: Sequence[int],
    seed: int = 0,
    window: int = 0,
) -> EvalResult:
    """Evaluate the engine's current policy on ``prompt_ids`` (P problems) with their ``answers``
    (``window``: problems thinking at once, 0 for all; see ``evaluate_samples``)."""
    if len(prompt_ids) != len(answers):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(answers)} answers")
    if not prompt_ids:
        raise ValueError("evaluation needs at least one problem")
    schedule = BudgetSchedule.from_budgets(budgets, prior)
    samples = evaluate_samples(
        engine, prompt_ids, answers, tokenizer, reward, schedule=schedule, temperature=temperature,
        samples_per_problem=samples_per_problem, summary_max_new_tokens=summary_max_new_tokens,
        eos_token_ids=eos_token_ids, seed=seed, window=window,
    )  # fmt: skip
    return eval_result([samples], schedule, samples_per_problem, temperature)


def mean_over_sets(results: dict[str, EvalResult]) -> EvalResult:
    """The unweighted mean of several sets' evaluations (every benchmark counts alike, as papers
    report an average column); standard errors combine as independent: sqrt(sum se^2) / K.
    ``num_problems`` is the total, ``sets`` each set's anytime score."""
    if not results:
        raise ValueError("mean_over_sets needs at least one evaluation")
    values = list(results.values())
    first = values[0]
    for name, result in results.items():
        if result.weights != first.weights or result.samples_per_problem != first.samples_per_problem:
            raise ValueError(f"evaluation set {name!r} has other budgets or samples per problem than the first")
    count = len(values)

    def mean(get) -> float:
        return sum(get(r) for r in values) / count

    def combined(get) -> float:
        return math.sqrt(sum(get(r) ** 2 for r in values)) / count

    budgets = list(first.accuracy)
    return EvalResult(
        anytime_score=mean(lambda r: r.anytime_score),
        stderr=combined(lambda r: r.stderr),
        num_problems=sum(r.num_problems for r in values),
        samples_per_problem=first.samples_per_problem,
        accuracy={b: mean(lambda r, b=b: r.accuracy[b]) for b in budgets},
        stderr_by_budget={b: combined(lambda r, b=b: r.stderr_by_budget[b]) for b in budgets},
        weights=dict(first.weights),
        mean_thinking_tokens=mean(lambda r: r.mean_thinking_tokens),
        closed_share=mean(lambda r: r.closed_share),
        temperature=first.temperature,
        sets={name: r.anytime_score for name, r in results.items()},
    )


def markdown_table(results: dict[str, EvalResult]) -> str:
    """Accuracy per budget and anytime score (+- standard error) of every run, one row each."""
    budgets = sorted({b for result in results.values() for b in result.accuracy})
    header = ["run", *(f"acc@{b}" for b in budgets), "anytime score", "problems", "thinking tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        cells = [name]
        for b in budgets:
            value = result.accuracy.get(b)
            cells.append("-" if value is None else f"{value:.3f} ± {result.stderr_by_budget[b]:.3f}")
        cells += [f"{result.anytime_score:.3f} ± {result.stderr:.3f}", str(result.num_problems),
                  f"{result.mean_thinking_tokens:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _draw_curves(axis, results: dict[str, EvalResult]) -> None:
    """Accuracy vs budget on ``axis``, one line per run with a band of +- one standard error."""
    for name, result in results.items():
        budgets = sorted(result.accuracy)
        accuracy = [result.accuracy[b] for b in budgets]
        errors = [result.stderr_by_budget[b] if math.isfinite(result.stderr_by_budget[b]) else 0.0 for b in budgets]
        axis.plot(budgets, accuracy, marker="o", label=f"{name} (anytime {result.anytime_score:.3f})")
        axis.fill_between(budgets, [a - e for a, e in zip(accuracy, errors, strict=True)],
                          [a + e for a, e in zip(accuracy, errors, strict=True)], alpha=0.2)  # fmt: skip
    axis.set_xlabel("thinking budget (tokens)")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)


def plot_curves(results: dict[str, EvalResult], path: str | Path, title: str = "accuracy vs thinking budget") -> Path:
    """PNG of accuracy vs budget, one line per run with a band of +- one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    _draw_curves(axes, results)
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def set_result_path(path: str | Path, set_name: str) -> Path:
    """Where the result of set ``set_name`` lies beside a mean over sets at ``path``
    (``eval/<name>.json`` -> ``eval/<name>/<set>.json``)."""
    path = Path(path)
    return path.parent / path.stem / f"{set_name}.json"


def load_set_results(path: str | Path, result: EvalResult) -> dict[str, EvalResult]:
    """The sets' results of ``result`` (a mean over sets read from ``path``; empty for one set)."""
    loaded = {}
    for set_name in result.sets or {}:
        set_path = set_result_path(path, set_name)
        if not set_path.is_file():
            raise FileNotFoundError(f"{path} is a mean over sets, but its set {set_name!r} has no {set_path}")
        loaded[set_name] = EvalResult.from_json(set_path)
    return loaded


def compare(paths: Sequence[Path], out: Path) -> None:
    """``anytime-eval --compare``: one table and one plot of the evaluations in ``paths``; for
    evaluations over named sets (``eval/<name>.json`` beside ``eval/<name>/<set>.json``), also a
    table by set and one panel per set (``compare_by_set.png``)."""
    results, by_set = {}, {}
    for path in paths:
        label = path.stem if path.stem not in ("final", "sft") else f"{path.parent.parent.name}/{path.stem}"
        results[label] = result = EvalResult.from_json(path)
        for set_name, set_result in load_set_results(path, result).items():
            by_set.setdefault(set_name, {})[label] = set_result
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    written = [out / "compare.md", out / "compare.png"]
    if by_set:
        rows = {f"{label} {set_name}": r for set_name, runs in by_set.items() for label, r in runs.items()}
        table += "\n\nBy set:\n\n" + markdown_table(rows)
        _plot_panels(by_set, out / "compare_by_set.png")
        written.append(out / "compare_by_set.png")
    written[0].write_text(table + "\n")
    plot_curves(results, written[1])
    print(table)
    print("wrote " + ", ".join(str(path) for path in written))


def _plot_panels(by_set: dict[str, dict[str, EvalResult]], path: Path) -> None:
    """One accuracy-vs-budget panel per set, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(by_set), figsize=(4 * len(by_set), 3.6), dpi=120, squeeze=False)
    for axis, (set_name, runs) in zip(axes[0], by_set.items(), strict=True):
        _draw_curves(axis, runs)
        axis.set_title(set_name)
        axis.legend(fontsize="small")
    axes[0][0].set_ylabel("accuracy")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    """``anytime-eval``: evaluate a checkpoint or model folder, or overlay saved evaluations."""
    parser = argparse.ArgumentParser(prog="anytime-eval", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="checkpoint or Hugging Face model folder")
    parser.add_argument("--config", help="run config YAML (default: the checkpoint's run_config.yaml)")
    parser.add_argument("--out", type=Path, default=Path("eval_out"), help="folder for the JSON, table and plot")
    parser.add_argument("--name", default="eval", help="name of this evaluation (its JSON file name)")
    parser.add_argument("--compare", nargs="+", type=Path, help="overlay these eval JSON files (no model needed)")
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value config overrides")
    args, unknown = parser.parse_known_args(argv)
    overrides = [*args.overrides, *unknown]
    if args.compare:
        compare(args.compare, args.out)
        return
    if args.model is None:
        parser.error("name a checkpoint/model folder, or --compare eval JSON files")
    from trainer.loop import evaluate_checkpoint

    result = evaluate_checkpoint(Path(args.model), args.config, overrides, args.out, args.name)
    sets = load_set_results(args.out / "eval" / f"{args.name}.json", result)  # named sets: the mean, then each
    print(markdown_table({args.name: result, **{f"{args.name} {name}": r for name, r in sets.items()}}))


if __name__ == "__main__":
    main()
