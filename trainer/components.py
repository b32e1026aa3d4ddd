"""Everything a run is made of, built from its config: data, tokenizer, models, engine, learner.

The rollout engine gets its own copy of the model (ordinary SDPA attention, KV cache) while the
learner's copy runs the packed tree forward; ``engine.update_weights`` syncs them after every
update. The synthetic task's problems are generated into the run folder (``data/*.jsonl``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.budgets import BudgetSchedule, Delimiters
from trainer.config import RunConfig
from trainer.data import DataConfig, Prompt, load_prompts
from trainer.learner import Learner, make_optimizer
from trainer.models import eos_token_ids, load_model, load_tokenizer
from trainer.policy import TreePolicy
from trainer.rewards import get_reward
from trainer.rollout import EmbeddedEngine, RolloutEngine

logger = logging.getLogger(__name__)


class PromptSampler:
    """``prompts_per_step`` prompts per step: a seeded shuffle per epoch, so step k's batch is a
    function of (seed, k) and a resumed run draws what the interrupted one would have."""

    def __init__(self, prompts: list[Prompt], per_step: int, seed: int) -> None:
        if not prompts:
            raise ValueError("no training prompts (check data.source, data.limit and data.max_prompt_tokens)")
        self.prompts, self.per_step, self.seed = prompts, per_step, seed

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def batch(self, step: int) -> list[Prompt]:
        out, orders = [], {}
        for index in range(step * self.per_step, (step + 1) * self.per_step):
            epoch, position = divmod(index, len(self.prompts))
            if epoch not in orders:
                orders[epoch] = self._order(epoch)
            out.append(self.prompts[orders[epoch][position]])
        return out


@dataclass
class RunParts:
    device: torch.device
    tokenizer: object
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    policy: TreePolicy
    learner: Learner
    engine: RolloutEngine
    schedule: BudgetSchedule
    reward: object
    eos_token_ids: list[int]
    sampler: PromptSampler


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but torch sees no CUDA device (use train.device=cpu or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _prompts(config: RunConfig, tokenizer, run_dir: Path) -> tuple[list[Prompt], list[Prompt]]:
    d = config.data
    sources = {"train": d.source, "eval": d.eval_source}
    if d.source == "synthetic" or d.eval_source is None:
        from trainer.synthetic import generate_rows, save_rows

        s = d.synthetic
        options = dict(min_steps=s.min_steps, max_steps=s.max_steps, modulus=s.modulus, max_operand=s.max_operand,
                       max_multiplier=s.max_multiplier)  # fmt: skip
        if s.check_probs is not None:
            options["check_probs"] = tuple(s.check_probs)
        if d.source == "synthetic":
            sources["train"] = str(save_rows(generate_rows(s.num_train, seed=s.seed, **options),
                                             run_dir / "data" / "train.jsonl"))  # fmt: skip
        if d.eval_source is None:
            sources["eval"] = str(save_rows(generate_rows(s.num_eval, seed=s.seed + 1, **options),
                                            run_dir / "data" / "eval.jsonl"))  # fmt: skip
    limits = {"train": d.limit, "eval": d.eval_limit}
    sets = {
        name: load_prompts(DataConfig(source=source, max_prompt_tokens=d.max_prompt_tokens, limit=limits[name]),
                           tokenizer).prompts
        for name, source in sources.items()
    }  # fmt: skip
    return sets["train"], sets["eval"]


def make_engine(config: RunConfig, model: torch.nn.Module, tokenizer, run_dir: Path) -> RolloutEngine:
    r = config.rollout
    if r.engine == "embedded":
        return EmbeddedEngine(model, tokenizer, max_batch_rows=r.max_batch_rows, seed=config.train.seed)
    if r.engine == "sglang":
        from trainer.rollout import SGLangEngine

        return SGLangEngine(r.urls, tokenizer, weights_dir=run_dir)
    from trainer.rollout import SGLangInProcessEngine

    if config.model.path is None:
        raise ValueError("rollout.engine sglang_inprocess loads the model from model.path; a fresh model has none")
    return SGLangInProcessEngine(config.model.path, tokenizer)


def norm_length(config: RunConfig, delimiters: Delimiters) -> int:
    """The ``token-sum-norm`` constant: one tree's padded response length, ``b_max`` + every branch at
    its cap (longest inserted delimiter + summary cap); 10176 for R1-Distill-Qwen at b_max 8000, S=A=4."""
    if config.loss.norm_length is not None:
        return config.loss.norm_length
    m = config.method
    branch = max(len(delimiters.truncated), len(delimiters.closed)) + config.rollout.summary_max_new_tokens
    return m.b_max + m.num_slots * m.num_summaries * branch


def build(config: RunConfig, run_dir: Path, *, resume: str | Path | None = None) -> RunParts:
    """All parts of a run, on the configured device; ``resume`` loads the weights of a checkpoint."""
    device = resolve_device(config.train.device)
    torch.manual_seed(config.train.seed)
    model_config = config.model
    if resume is not None:
        model_config = dataclasses.replace(
            model_config, path=str(resume), tokenizer="model", config=None, gguf_file=None
        )
    tokenizer = load_tokenizer(model_config)
    train_prompts, eval_prompts = _prompts(config, tokenizer, run_dir)
    model = load_model(model_config, tokenizer, device, seed=config.train.seed)
    rollout_model = copy.deepcopy(model).eval() if config.rollout.engine == "embedded" else model
    engine = make_engine(config, rollout_model, tokenizer, run_dir)
    autocast = model_config.autocast
    if autocast == "auto":
        autocast = "bfloat16" if device.type == "cuda" else None
    policy = TreePolicy(
        model,
        attention_backend=model_config.attention_backend,
        gradient_checkpointing=model_config.gradient_checkpointing,
        autocast_dtype=torch.bfloat16 if autocast == "bfloat16" else None,
        micro_batch_tokens=config.train.micro_batch_tokens,
    )
    reference = None
    if config.loss.kl_coef > 0:
        reference_model = copy.deepcopy(model).requires_grad_(False)
        reference = TreePolicy(reference_model, attention_backend=model_config.attention_backend,
                               autocast_dtype=policy.autocast_dtype,
                               micro_batch_tokens=config.train.micro_batch_tokens)  # fmt: skip
    t = config.train
    updates_per_step = t.ppo_epochs * (t.prompts_per_step // t.ppo_mini_batch_prompts)
    optimizer, scheduler = make_optimizer(model, config.optim, total_steps=t.steps * updates_per_step)
    learner = Learner(
        policy, optimizer, scheduler, config.loss,
        grad_clip=config.optim.grad_clip, norm_length=norm_length(config, engine.delimiters),
        temperature=config.rollout.temperature, reference=reference, seed=t.seed,
    )  # fmt: skip
    m = config.method
    prior = m.prior if isinstance(m.prior, str) else tuple(m.prior)
    return RunParts(
        device=device,
        tokenizer=tokenizer,
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        policy=policy,
        learner=learner,
        engine=engine,
        schedule=BudgetSchedule(m.b_max, m.num_slots, prior),
        reward=get_reward(config.rollout.reward),
        eos_token_ids=eos_token_ids(model, tokenizer),
        sampler=PromptSampler(train_prompts, t.prompts_per_step, t.seed),
    )
