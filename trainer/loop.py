"""The lean trainer: one RL step reads like the data flow of ARCHITECTURE.md.

    prompts -> think (G traces) -> summarize (A per slot, prefix shared) -> score -> pack
    -> BRPO advantages -> old log-probs -> PPO-clip updates -> weight sync -> metrics

``Trainer.rl_step`` is that step; ``Trainer.run`` adds the SFT warm-up, periodic anytime
evaluation, checkpoints and the report. Setup (models, data, engine) is in ``trainer.components``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
import time
from pathlib import Path

import torch
import yaml

from anytime_kernels import advantage_stats
from trainer import components
from trainer.batches import build_train_batch, score_rollouts
from trainer.budgets import BudgetSchedule
from trainer.checkpoint import (
    latest_checkpoint,
    load_rng_state,
    load_trainer_state,
    prune_checkpoints,
    save_checkpoint,
    write_text_atomic,
)
from trainer.config import RunConfig, load_config
from trainer.distributed import (
    all_reduce_max,
    barrier,
    broadcast,
    full_state_dict,
    gather_to_main,
    load_full_weights,
    load_sharded,
    save_sharded,
    share_of,
    shutdown,
)
from trainer.evaluate import (
    EvalResult,
    eval_result,
    evaluate_samples,
    load_set_results,
    markdown_table,
    mean_over_sets,
    plot_curves,
    set_result_path,
)
from trainer.metrics import Display, MetricsLogger, NullMetrics, PhaseTimer, environment, plot_training_curves
from trainer.rollout import SamplingParams, SummaryBatch, ThinkingBatch
from trainer.rollout.base import RolloutStats
from trainer.sft import sft_examples, sft_warmup
from trainer.stopping import RunStopped, StopSignals

logger = logging.getLogger(__name__)


class Trainer:
    """Owns the run: policy, learner, rollout engine, reward, data, metrics, run folder."""

    def __init__(self, config: RunConfig, run_dir: str | Path, *, resume: str | Path | None = None) -> None:
        """``resume``: a checkpoint folder, or ``"auto"`` for the newest complete checkpoint of
        ``run_dir`` (a fresh start when there is none)."""
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        auto = resume == "auto"
        if auto:
            resume = latest_checkpoint(self.run_dir / "checkpoints")
            logger.info("resume auto: %s", resume or "no complete checkpoint, starting fresh")
        self.resumed_from = Path(resume) if resume is not None else None
        self.parts = components.build(config, self.run_dir, resume=resume)
        self.start_step = 0
        self.sft_done = False
        self.context = self.parts.context
        # rollout.every_rank: each rank's engine rolls out its share of the prompts (else rank 0's all).
        self.every_rank = config.rollout.every_rank and self.context.enabled
        # data.eval_source as {set: source}: each evaluation also keeps its sets' results, by name.
        self.named_eval_sets = isinstance(config.data.eval_source, dict)
        self.set_results: dict[str, dict[str, EvalResult]] = {}
        if resume is not None:
            state = load_trainer_state(Path(resume), self.parts.learner.optimizer, self.parts.learner.scheduler)
            if (Path(resume) / "dcp").is_dir():  # sharded optimizer (and weights) of a distributed run
                load_sharded(Path(resume) / "dcp", self.parts.policy.module, self.parts.learner.optimizer)
            self.start_step, self.sft_done = state["step"], state.get("sft_done", True)
            self._restore_random_states(load_rng_state(Path(resume)))
            if self.context.is_main and self._own_checkpoint(Path(resume)):
                _truncate_lines(self.run_dir / "metrics.jsonl", state.get("metrics_lines"))
            # Servers restarted after a crash hold the base model: sample from the checkpoint's weights.
            self._sync_weights()
        elif auto and self.context.is_main and (self.run_dir / "metrics.jsonl").is_file():
            # An earlier attempt stopped before its first checkpoint: its records describe nothing kept.
            _truncate_lines(self.run_dir / "metrics.jsonl", 0)
        self.sampling = SamplingParams(temperature=config.rollout.temperature, top_p=config.rollout.top_p)
        self.metrics = (
            MetricsLogger(
                self.run_dir,
                tensorboard=config.logging.tensorboard,
                wandb=config.logging.wandb,
                project=config.logging.wandb_project,
                config=config.to_dict(),
            )
            if self.context.is_main
            else NullMetrics()
        )
        self.display: Display | None = None
        if self.context.is_main:
            self._record_start()
        if self.start_step == 0:
            self.metrics.log(0, self.parts.data_counts)

    def _record_start(self) -> None:
        """``run_config.yaml`` (the resolved config) and one more entry of ``environment.json``
        (versions, commit, devices, command line) in the run folder, before any work; a resume
        whose config differs from the folder's says which keys changed."""
        path = self.run_dir / "run_config.yaml"
        current = self.config.to_dict()
        earlier = _read_or_none(path, yaml.safe_load)
        if isinstance(earlier, dict):
            changed = _changed_keys(earlier, current)
            if changed:
                logger.warning("the config differs from %s's in %s", path, ", ".join(changed))
        write_text_atomic(path, yaml.safe_dump(current, sort_keys=False))
        starts_path = self.run_dir / "environment.json"
        starts = _read_or_none(starts_path, json.loads)
        starts = starts if isinstance(starts, list) else []
        starts.append({**environment(), "start_step": self.start_step})
        write_text_atomic(starts_path, json.dumps(starts, indent=2) + "\n")

    # -- one RL step ---------------------------------------------------------------------------

    def rl_step(self, step: int) -> dict[str, float]:
        """Rollout, reward, advantages and PPO updates for one batch of prompts; returns its metrics.

        With several ranks, rank 0 rolls out and scores; every rank trains its share of the trees.
        """
        p, c = self.parts, self.config
        timer = PhaseTimer(self.display)
        batch = rollout_metrics = None
        if self.context.is_main or self.every_rank:
            prompts = p.sampler.batch(step)
            # Think and summarize overlap (a prompt's forks go out once its traces are back); the
            # engine splits the wall time: until the last trace is back, and the rest.
            if timer.display is not None:
                timer.display.phase("rollout")
            seen = p.engine.stats.think.seconds, p.engine.stats.summarize.seconds
            share = share_of(prompts, self.context) if self.every_rank else prompts
            traces = rollouts = None
            if share:
                traces, rollouts = p.engine.rollout(
                    [q.token_ids for q in share], c.rollout.group_size, c.method.b_max, p.schedule,
                    c.method.num_summaries, self.sampling, c.rollout.summary_max_new_tokens,
                    window=c.rollout.stream_window,
                )  # fmt: skip
            timer.seconds["think"] = p.engine.stats.think.seconds - seen[0]
            timer.seconds["summarize"] = p.engine.stats.summarize.seconds - seen[1]
            engine_stats = p.engine.reset_stats()
            if self.every_rank:
                # Rank 0 puts the shares back together in prompt order (rank order is prompt order).
                with timer.phase("gather"):
                    parts = gather_to_main((traces, rollouts, engine_stats), self.context)
                if parts is not None:
                    traces = ThinkingBatch.concatenate([t for t, _, _ in parts if t is not None])
                    rollouts = SummaryBatch.concatenate([r for _, r, _ in parts if r is not None])
                    engine_stats = RolloutStats.combine([e for _, _, e in parts])
        if self.context.is_main:
            with timer.phase("score"):
                answers = [q.answer for q in prompts for _ in range(c.rollout.group_size)]
                scored = score_rollouts(
                    rollouts, answers, p.tokenizer, p.reward, think_end_id=p.engine.delimiters.think_end_id,
                    eos_token_ids=p.eos_token_ids, group_size=c.rollout.group_size,
                )  # fmt: skip
            with timer.phase("advantages"):
                batch = build_train_batch(
                    scored, p.schedule, variance_reduction=c.method.variance_reduction,
                    summary_method=c.method.summary_method,
                )  # fmt: skip
            rollout_metrics = self._rollout_metrics(traces, scored, batch, engine_stats)
        if self.context.enabled:
            with timer.phase("broadcast"):
                batch = broadcast(batch, self.context)
        if p.engine is not None:
            p.engine.release_memory()  # a colocated engine frees the GPU for the update
        with timer.phase("update"):
            train_metrics = p.learner.update(batch, c.train.ppo_mini_batch_prompts, c.train.ppo_epochs)
        with timer.phase("sync"):
            self._sync_weights()
        if rollout_metrics is None:  # other ranks: what rank 0 logs is what counts
            rollout_metrics = {"rollout/reward_mean": float("nan"), "rollout/anytime_score": float("nan")}
        return {**rollout_metrics, **train_metrics, **timer.metrics()}

    def _sync_weights(self) -> None:
        """The rollout engine samples from the weights the learner just updated."""
        p = self.parts
        if not self.context.enabled:
            p.engine.update_weights(p.policy.model)
            return
        if self.every_rank:  # every rank's engine samples: every rank gathers the full weights
            load_full_weights(p.policy.module, p.host_model)
            p.engine.update_weights(p.host_model)
            return
        state = full_state_dict(p.policy.module, self.context)  # collective; keys "model.<name>"
        if self.context.is_main:
            p.host_model.load_state_dict({key.removeprefix("model."): value for key, value in state.items()})
            p.engine.update_weights(p.host_model)

    # -- the run -------------------------------------------------------------------------------

    def run(self, max_steps: int | None = None, *, evaluate_start: bool = True) -> dict[str, EvalResult]:
        """SFT warm-up, evaluation, RL steps (with periodic evaluation), final evaluation and report.

        ``evaluate_start=False`` skips the evaluation before RL when there is no SFT to evaluate
        (e.g. several runs that start from one evaluated SFT checkpoint). A stop signal
        (``train.stop_signals``, default SIGUSR1) stops the run at its next boundary with a
        checkpoint and raises ``trainer.stopping.RunStopped`` (see that module).
        """
        c = self.config
        total = self.parts.rl_steps
        steps = total if max_steps is None else min(max_steps, total)
        sft_steps = c.sft.steps
        if max_steps is not None and total > 0:
            sft_steps = max(1, round(c.sft.steps * steps / total)) if c.sft.steps else 0
        evaluations: dict[str, EvalResult] = {}
        start = time.perf_counter()
        if self.start_step > steps:
            raise ValueError(
                f"the run resumed at RL step {self.start_step}, past its last step {steps} (train.steps="
                f"{c.train.steps}, train.epochs={c.train.epochs}"
                + (f", --max-steps {max_steps}" if max_steps is not None else "")
                + "): nothing to do"
            )
        if sft_steps and not self.sft_done and self.context.enabled:
            raise ValueError(
                "the SFT warm-up runs in one process: run it with sft.steps and train.steps=0 on one process, "
                "then start the distributed run with --resume from its checkpoints/sft"
            )
        with StopSignals(c.train.stop_signals) as stop:
            try:
                if sft_steps and not self.sft_done:
                    self._sft(sft_steps)
                    sft = self.save("sft", 0)  # the start of RL, e.g. for comparing methods from one SFT model
                    self._stop_if_signalled(stop, 0, sft)  # before the evaluation of the SFT model
                    evaluations["sft"] = self.evaluate("sft", step=0)
                    self._stop_if_signalled(stop, 0, sft)
                elif self.start_step == 0 and evaluate_start:
                    # Resumed from this folder's SFT checkpoint (a stop after the warm-up): its evaluation
                    # is "sft", and is not run again when the stopped run wrote it.
                    # (A finished SFT-only run resumes from "final" at step 0: the same SFT weights.)
                    own_sft = self._resumed_from_own("sft") or (self._resumed_from_own("final") and self.sft_done)
                    name = "sft" if own_sft else "start"
                    evaluations[name] = self._evaluate_or_reuse(name, 0, reuse=own_sft)
                    self._stop_if_signalled(stop, 0, self.resumed_from)
                elif c.eval.every and self.start_step % c.eval.every == 0 and 0 < self.start_step < steps:
                    # The step's periodic evaluation follows its checkpoint: the run stopped (or crashed)
                    # before it finished, and it runs now, or it finished and is reused.
                    # A finished run resumed for more steps: its final evaluation scored these weights
                    # (reused where the periodic evaluations run the same sets and samples).
                    name = f"step{self.start_step}"
                    source = "final" if self._resumed_from_own("final") else name
                    plans = [self._evaluation_plan(n) for n in (name, source)]
                    same_plan = all((k, list(sets)) == (plans[0][0], list(plans[0][1])) for k, sets in plans)
                    self._evaluate_or_reuse(name, self.start_step, reuse=self._resumed_from_own(source) and same_plan,
                                            source=source)  # fmt: skip
                self.display = Display(
                    steps - self.start_step, "RL", enabled=c.logging.progress and self.context.is_main
                )
                for step in range(self.start_step, steps):
                    step_start = time.perf_counter()
                    metrics = self.rl_step(step)
                    metrics["time/step_s"] = time.perf_counter() - step_start
                    metrics["time/tokens_per_s"] = metrics["train/trained_tokens"] / metrics["time/step_s"]
                    stopping = self._stop_requested(stop)  # before a periodic evaluation, which can be long
                    self.metrics.log(step + 1, metrics)
                    self.display.advance(
                        f"reward {metrics['rollout/reward_mean']:.3f} anytime {metrics['rollout/anytime_score']:.3f}"
                    )
                    saved = None
                    if (c.train.save_every and (step + 1) % c.train.save_every == 0) or stopping:
                        saved = self.save(f"step{step + 1}", step + 1)
                    if stopping:  # also after the last step: the final evaluation runs on resume
                        raise RunStopped(stopping, step + 1, saved)
                    # After the step's checkpoint: a crash during the evaluation loses only the evaluation,
                    # which a resume from that checkpoint runs again.
                    if c.eval.every and (step + 1) % c.eval.every == 0 and step + 1 < steps:
                        self.evaluate(f"step{step + 1}", step=step + 1)
                        if saved is not None:  # a signal during the evaluation: the resume reuses it
                            self._stop_if_signalled(stop, step + 1, saved)
                self.display.close()
                # The trained weights are saved before the final evaluation (the longest one): a crash or
                # a kill during it loses only the evaluation, which a resume from "final" runs again.
                finished = self._resumed_from_own("final") and self.start_step == steps  # nothing trained since
                if not finished:
                    self._stop_if_signalled(stop, steps, self.save("final", steps))
                evaluations["final"] = self._evaluate_or_reuse("final", steps, reuse=finished)
                if self.context.is_main:
                    self._report(self._with_earlier_evaluations(evaluations), time.perf_counter() - start)
            finally:
                if self.display is not None:
                    self.display.close()
                self.metrics.close()
        return evaluations

    def _stop_requested(self, stop: StopSignals) -> int:
        """The stop signal's number when any rank received one, else 0; every rank takes part (one
        all-reduce), so the ranks stop at the same point."""
        return all_reduce_max(stop.received or 0, self.context)

    def _stop_if_signalled(self, stop: StopSignals, step: int, checkpoint: Path | None) -> None:
        number = self._stop_requested(stop)
        if number:
            raise RunStopped(number, step, checkpoint, auto=checkpoint is None or self._own_checkpoint(checkpoint))

    def _sft(self, steps: int) -> None:
        p = self.parts
        examples = sft_examples(p.train_prompts, p.tokenizer)
        display = Display(steps, "SFT", enabled=self.config.logging.progress)

        def on_step(step: int, metrics: dict) -> None:
            if (step + 1) % 10 == 0 or step + 1 == steps:
                self.metrics.log(-steps + step + 1, metrics)
            display.advance(f"loss {metrics['sft/loss']:.3f}")

        try:
            sft_warmup(p.policy, examples, self.config.sft, seed=self.config.train.seed, steps=steps, on_step=on_step)
        finally:
            display.close()
        p.engine.update_weights(p.policy.model)
        self.sft_done = True

    def evaluate(self, name: str, step: int) -> EvalResult | None:
        """Anytime evaluation of the current policy on the held-out problems -> ``eval/<name>.json``
        (rank 0, which holds the engine; None on the other ranks). With ``rollout.every_rank``,
        rank k samples the k-th share of the problems at seed ``train.seed + 1 + k`` and rank 0
        takes the statistics over all of them.

        With named sets (``data.eval_source`` a mapping), each set is evaluated on its own
        (``eval/<name>/<set>.json``, metrics ``eval/<set>/...``) and the result is their mean
        (``mean_over_sets``); ``self.set_results[name]`` keeps the sets' results.

        The random streams training draws from (torch's, Python's, the engine's sampling generator,
        which a seeded evaluation reseeds) are as the evaluation found them when it returns: the
        training run does not depend on when, or whether, it evaluated.
        """
        with self._random_streams_kept():
            return self._evaluate(name, step)

    @contextlib.contextmanager
    def _random_streams_kept(self):
        generator = getattr(self.parts.engine, "_generator", None)  # none on ranks > 0 without every_rank
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        saved = (torch.get_rng_state(), random.getstate(), generator.get_state() if generator is not None else None,
                 torch.cuda.get_rng_state() if cuda else None)  # fmt: skip
        try:
            yield
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            if generator is not None:
                generator.set_state(saved[2])
            if saved[3] is not None:
                torch.cuda.set_rng_state(saved[3])

    def _evaluate(self, name: str, step: int) -> EvalResult | None:
        p, c = self.parts, self.config
        if not (self.context.is_main or self.every_rank):
            return None
        schedule = BudgetSchedule.from_budgets(c.eval.budgets or p.schedule.budgets, c.eval.prior)
        samples_per_problem, eval_sets = self._evaluation_plan(name)
        results = {}
        for set_name, all_prompts in eval_sets.items():
            # Not empty: build() refuses an empty set, the config an eval.num_problems below 1.
            prompts = all_prompts[: c.eval.num_problems] if c.eval.num_problems else all_prompts
            share = share_of(prompts, self.context) if self.every_rank else prompts
            if self.context.is_main:
                what = f"eval {name}" + (f" {set_name}" if self.named_eval_sets else "")
                logger.info("%s: %d problems x %d samples", what, len(prompts), samples_per_problem)
                if self.display is not None:  # a periodic evaluation inside the RL bar
                    self.display.phase(what)
            samples = None
            if share:
                samples = evaluate_samples(
                    p.engine, [q.token_ids for q in share], [q.answer for q in share], p.tokenizer, p.reward,
                    schedule=schedule, temperature=c.eval.temperature,
                    samples_per_problem=samples_per_problem,
                    summary_max_new_tokens=c.eval.summary_max_new_tokens or c.rollout.summary_max_new_tokens,
                    eos_token_ids=p.eos_token_ids, seed=c.train.seed + 1 + self.context.rank,  # rank 0 unless every_rank
                    window=c.rollout.stream_window,
                )  # fmt: skip
            p.engine.reset_stats()
            parts = gather_to_main(samples, self.context) if self.every_rank else [samples]
            if parts is not None:  # ranks > 0 only sample
                results[set_name] = eval_result([part for part in parts if part is not None], schedule,
                                                samples_per_problem, c.eval.temperature)  # fmt: skip
        if not self.context.is_main:
            return None
        if not self.named_eval_sets:
            result = results["eval"]
        else:
            self.set_results[name] = results
            result = mean_over_sets(results)
        self._write_evaluation(name, result)
        self._log_evaluation(step, name, result)
        sets = "".join(f", {k} {v.anytime_score:.3f}" for k, v in results.items()) if self.named_eval_sets else ""
        logger.info("eval %s: anytime score %.3f +- %.3f%s", name, result.anytime_score, result.stderr, sets)
        return result

    def _evaluation_plan(self, name: str) -> tuple[int, dict]:
        """``(samples per problem, {set: prompts})`` of evaluation ``name``: a periodic one
        (``step<N>``) runs on ``eval.periodic_sets`` with ``eval.periodic_samples_per_problem``, as
        the authors validate during training; the others on every set."""
        e, sets = self.config.eval, self.parts.eval_sets
        if re.fullmatch(r"step\d+", name) is None:
            return e.samples_per_problem, sets
        chosen = {set_name: sets[set_name] for set_name in e.periodic_sets} if e.periodic_sets else sets
        return e.periodic_samples_per_problem or e.samples_per_problem, chosen

    def save(self, name: str, step: int) -> Path:
        """A complete resumable checkpoint; keeps the newest ``train.keep_checkpoints`` periodic ones.

        With several ranks: the sharded model and optimizer go through ``torch.distributed.checkpoint``
        (``dcp/``, loadable on any world size) and rank 0 adds the Hugging Face export.
        """
        p = self.parts
        path = self.run_dir / "checkpoints" / name
        if self.context.is_main:
            # An evaluation of this name from an earlier attempt scored other weights: a resume from
            # this checkpoint must not reuse it (its own evaluation follows the checkpoint).
            (self.run_dir / "eval" / f"{name}.json").unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / "eval" / name, ignore_errors=True)
        common = dict(step=step, sft_done=self.sft_done, scheduler=p.learner.scheduler,
                      rng_state=self._random_states(), metrics_lines=self.metrics.lines)  # fmt: skip
        if not self.context.enabled:
            save_checkpoint(path, p.policy.model, p.tokenizer, self.config, optimizer=p.learner.optimizer, **common)
        else:
            partial = path.with_name(path.name + ".partial")
            if self.context.is_main:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            barrier(self.context)
            save_sharded(partial / "dcp", p.policy.module, p.learner.optimizer)
            # The export holds the learner's weights: the engine's copy may be in rollout.dtype.
            weights = full_state_dict(p.policy.module, self.context)  # a collective; rank 0 gets them
            barrier(self.context)
            if self.context.is_main:
                weights = {key.removeprefix("model."): value for key, value in weights.items()}
                if getattr(p.host_model.config, "tie_word_embeddings", False):
                    weights.pop("lm_head.weight", None)  # the embedding matrix, saved once as in one process
                save_checkpoint(path, p.host_model, p.tokenizer, self.config, reuse_partial=True,
                                state_dict=weights, **common)  # fmt: skip
            barrier(self.context)
        if self.context.is_main:
            prune_checkpoints(self.run_dir / "checkpoints", self.config.train.keep_checkpoints)
        return path

    def _random_states(self) -> dict:
        states = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "learner": self.parts.learner.rng.getstate(),
        }
        generator = getattr(self.parts.engine, "_generator", None)  # no engine on ranks > 0
        if generator is not None:
            states["engine"] = generator.get_state()
            states["engine_device"] = generator.device.type
        if self.every_rank:  # a collective: save() runs on every rank
            states["engine_ranks"] = gather_to_main(states.get("engine"), self.context)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # This process's device only: a resume may see another number of GPUs.
            states["cuda_device"] = torch.cuda.get_rng_state()
        return states

    def _restore_random_states(self, states: dict | None) -> None:
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        random.setstate(states["python"])
        self.parts.learner.rng.setstate(states["learner"])
        generator = getattr(self.parts.engine, "_generator", None)
        ranks = states.get("engine_ranks") or []
        if self.every_rank and len(ranks) == self.context.world_size:  # each rank its own stream
            states = {**states, "engine": ranks[self.context.rank]}
        elif self.every_rank and not self.context.is_main and "engine" in states:
            # Saved by rank 0 alone (or by another number of ranks): the rank's seeded stream goes on.
            states = {key: value for key, value in states.items() if key != "engine"}
        if generator is not None and "engine" in states:
            if states.get("engine_device", generator.device.type) == generator.device.type:
                generator.set_state(states["engine"])
            else:  # a CPU generator's state does not fit a CUDA one (or the reverse)
                logger.warning(
                    "the checkpoint's sampling RNG is a %s generator and this engine's a %s one: sampling "
                    "continues from a fresh stream", states["engine_device"], generator.device.type,
                )  # fmt: skip
        if torch.cuda.is_available():
            if "cuda_device" in states:
                torch.cuda.set_rng_state(states["cuda_device"])
            elif "cuda" in states and torch.cuda.current_device() < len(states["cuda"]):  # older checkpoints
                torch.cuda.set_rng_state(states["cuda"][torch.cuda.current_device()])

    def _with_earlier_evaluations(self, evaluations: dict[str, EvalResult | None]) -> dict[str, EvalResult]:
        """``evaluations`` with the starting one (``sft`` or ``start``) first: a resumed run reads it
        (and its sets' results) from the run folder, where the run that made it wrote it."""
        done = {name: result for name, result in evaluations.items() if result is not None}
        if "sft" in done or "start" in done:
            return done
        for name in ("sft", "start"):
            earlier = self._load_evaluation(name)
            if earlier is not None:
                return {name: earlier, **done}
        return done

    def _own_checkpoint(self, path: Path) -> bool:
        """Whether ``path`` is a checkpoint of this run's folder (however either path is written)."""
        return Path(path).resolve().parent == (self.run_dir / "checkpoints").resolve()

    def _resumed_from_own(self, name: str) -> bool:
        """Whether this run resumed from its own folder's checkpoint ``name``."""
        resumed = self.resumed_from
        return resumed is not None and self._own_checkpoint(resumed) and resumed.resolve().name == name

    def _evaluate_or_reuse(self, name: str, step: int, *, reuse: bool, source: str | None = None) -> EvalResult | None:
        """Evaluation ``name`` at ``step``. With ``reuse`` (the same on every rank), the folder's
        finished ``eval/<source>.json`` (default: ``name``'s) when every rank reads it (one
        all-reduce: a rank that evaluated while another reused would wait in the evaluation's
        collectives), its records logged again (they went with the checkpoint's truncation of
        metrics.jsonl), and written as ``eval/<name>.json`` when ``source`` is another name."""
        source = source or name
        earlier = self._load_evaluation(source, as_name=name) if reuse else None
        if not reuse or all_reduce_max(int(earlier is None), self.context):
            return self.evaluate(name, step=step)
        if source != name and self.context.is_main:
            self._write_evaluation(name, earlier)
        self._log_evaluation(step, name, earlier)
        return earlier

    def _write_evaluation(self, name: str, result: EvalResult) -> None:
        """``eval/<name>.json``, and with named sets each set's ``eval/<name>/<set>.json`` first."""
        path = self.run_dir / "eval" / f"{name}.json"
        for set_name, set_result in self.set_results.get(name, {}).items():
            set_result.to_json(set_result_path(path, set_name))
        result.to_json(path)

    def _log_evaluation(self, step: int, name: str, result: EvalResult) -> None:
        """The metrics of evaluation ``name``: each named set's (``eval/<set>/...``), then the result's."""
        for set_name, set_result in self.set_results.get(name, {}).items():
            self.metrics.log(step, _eval_metrics(set_result, f"eval/{set_name}/"))
        self.metrics.log(step, _eval_metrics(result, "eval/"))

    def _load_evaluation(self, name: str, as_name: str | None = None) -> EvalResult | None:
        """``eval/<name>.json`` of this run folder (and its sets' results, kept under ``as_name``,
        default ``name``), or None when absent."""
        path = self.run_dir / "eval" / f"{name}.json"
        if not path.is_file():
            return None
        result = EvalResult.from_json(path)
        if result.sets:
            self.set_results[as_name or name] = load_set_results(path, result)
        return result

    def _report(self, evaluations: dict[str, EvalResult], seconds: float) -> None:
        plot_curves(evaluations, self.run_dir / "budget_accuracy.png", title=f"{self.config.name}: accuracy vs budget")
        names = list(evaluations)
        lines = [f"# {self.config.name}", "", markdown_table(evaluations), ""]
        if len(names) >= 2:
            first, last = evaluations[names[0]], evaluations[names[-1]]
            gain = last.anytime_score - first.anytime_score
            combined = (first.stderr**2 + last.stderr**2) ** 0.5
            lines.append(
                f"Anytime score {names[0]} -> {names[-1]}: {first.anytime_score:.3f} -> {last.anytime_score:.3f} "
                f"({gain:+.3f}, {gain / combined if combined > 0 else float('nan'):.1f} combined standard errors) "
                f"on {last.num_problems} held-out problems x {last.samples_per_problem} samples."
            )
        plots = "budget_accuracy.png"
        curves = plot_training_curves(self.metrics.path, self.run_dir / "training_curves.png",
                                      title=f"{self.config.name}: RL steps")  # fmt: skip
        if curves is not None:
            plots += ", training_curves.png"
        by_set = {name: self.set_results[name] for name in evaluations if name in self.set_results}
        if by_set:
            sets = ", ".join(next(iter(by_set.values())))
            lines += ["", f"Each evaluation above is the mean over the sets {sets}; by set:", "",
                      markdown_table({f"{name} {set_name}": result for name, results in by_set.items()
                                      for set_name, result in results.items()})]  # fmt: skip
            last = list(by_set)[-1]
            plot_curves(by_set[last], self.run_dir / "budget_accuracy_by_set.png",
                        title=f"{self.config.name} ({last}): accuracy vs budget by set")  # fmt: skip
            plots += ", budget_accuracy_by_set.png"
        lines += ["", f"Wall time {seconds:.0f} s; per-step metrics in metrics.jsonl; plots: {plots}."]
        (self.run_dir / "report.md").write_text("\n".join(lines) + "\n")

    # -- metrics -------------------------------------------------------------------------------

    def _rollout_metrics(self, traces, scored, batch, engine_stats: RolloutStats) -> dict[str, float]:
        p = self.parts
        stats = advantage_stats(scored.scores, batch.layout.cut_lens, scored.group_size, p.schedule.probs)
        mean_score = stats.mean_score.tolist()
        summaries = [len(ids) for per_trace in scored.rollouts.summary_ids for slot in per_trace for ids in slot]
        uniform = 1.0 / len(mean_score)
        anytime = sum(uniform * s for s in mean_score)
        metrics = {
            "anytime_score": anytime,  # of this step's rollouts, uniform over the training budgets
            "rollout/reward_mean": float(scored.scores.mean()),
            "rollout/anytime_score": anytime,
            **{f"rollout/accuracy@{b}": s for b, s in zip(p.schedule.budgets, mean_score, strict=True)},
            "rollout/thinking_tokens": sum(traces.thinking_lens) / max(traces.num_traces, 1),
            "rollout/summary_tokens": sum(summaries) / max(len(summaries), 1),
            "rollout/closed_share": sum(f == "think_end" for f in traces.finish) / max(traces.num_traces, 1),
            "rollout/cache_hit_share": engine_stats.summarize.cache_hit_share,
            "rollout/sampled_tokens": float(
                engine_stats.think.generated_tokens + engine_stats.summarize.generated_tokens
            ),
            "rollout/packed_tokens": float(batch.layout.num_tokens),
            **{
                k.replace("reward/", "rollout/reward_"): v
                for k, v in scored.reward_metrics.items()
                if k != "reward/mean"
            },
        }
        for name, ratios in stats.variance_ratio.items():
            for b, value in zip(p.schedule.budgets, ratios.tolist(), strict=True):
                metrics[f"advantages/variance_ratio/{name}@{b}"] = value
        for name, variances in stats.advantage_variance.items():  # to pool the ratio over steps
            for b, value in zip(p.schedule.budgets, variances.tolist(), strict=True):
                metrics[f"advantages/advantage_variance/{name}@{b}"] = value
        for b, value in zip(p.schedule.budgets, stats.return_variance.tolist(), strict=True):
            metrics[f"advantages/return_variance@{b}"] = value
        return metrics


def _read_or_none(path: Path, parse):
    """``parse`` of the file's text; None when it is missing or unreadable (with a warning)."""
    if not path.is_file():
        return None
    try:
        return parse(path.read_text())
    except (ValueError, yaml.YAMLError) as error:
        logger.warning("%s cannot be read (%s); it is written anew", path, error)
        return None


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config mappings."""
    changed = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return changed


def _eval_metrics(result: EvalResult, prefix: str) -> dict[str, float]:
    return {f"{prefix}anytime_score": result.anytime_score, f"{prefix}stderr": result.stderr,
            **{f"{prefix}accuracy@{b}": a for b, a in result.accuracy.items()}}  # fmt: skip


def _truncate_lines(path: Path, lines: int | None) -> None:
    """Keep the first ``lines`` lines of ``path``: the metrics a resumed checkpoint covers (a crash
    after the checkpoint would otherwise leave the steps it redoes twice)."""
    if lines is None or not path.is_file():
        return
    kept = path.read_text().splitlines(keepends=True)[:lines]
    path.write_text("".join(kept))


def train(config: RunConfig, run_dir: str | Path, *, max_steps: int | None = None, resume=None):
    """Run a whole training job; returns the evaluations by name."""
    trainer = Trainer(config, run_dir, resume=resume)
    try:
        evaluations = trainer.run(max_steps)
    except RunStopped:
        shutdown(trainer.context)  # every rank stopped after the same step
        raise
    shutdown(trainer.context)
    return evaluations


def evaluate_checkpoint(model_dir: Path, config_path: str | None, overrides, out_dir: Path, name: str) -> EvalResult:
    """Evaluate a checkpoint (or model folder) with its saved run config (or ``config_path``)."""
    config_file = config_path or (model_dir / "run_config.yaml" if (model_dir / "run_config.yaml").exists() else None)
    config = load_config(config_file, [*overrides, f"model.path={model_dir}", "model.tokenizer=model",
                                       "model.config=null", "model.gguf_file=null"])  # fmt: skip
    trainer = Trainer(config, out_dir)
    try:
        trainer._sync_weights()  # an SGLang server scores the checkpoint, not whatever it holds
        return trainer.evaluate(name, step=0)
    finally:
        trainer.metrics.close()
