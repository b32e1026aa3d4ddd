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
from trainer.data import DataConfig, DataError, Prompt, load_prompts
from trainer.distributed import (
    SINGLE_PROCESS,
    Distributed,
    fsdp_param_dtype,
    local_device,
    setup_distributed,
    shard_policy,
)
from trainer.learner import Learner, make_optimizer
from trainer.models import eos_token_ids, load_model, load_tokenizer
from trainer.policy import TreePolicy
from trainer.rewards import get_reward
from trainer.rollout import EmbeddedEngine, RolloutEngine

logger = logging.getLogger(__name__)


class PromptSampler:
    """``prompts_per_step`` prompts per step: a seeded shuffle per epoch, cut into
    ``steps_per_epoch`` batches with the incomplete last one dropped (verl's ``drop_last``), so
    step k's batch is a function of (seed, k) and a resumed run draws what the interrupted one would
    have."""

    def __init__(self, prompts: list[Prompt], per_step: int, seed: int) -> None:
        if not prompts:
            raise ValueError("no training prompts (check data.source, data.limit and data.max_prompt_tokens)")
        self.prompts, self.per_step, self.seed = prompts, per_step, seed
        self.steps_per_epoch = len(prompts) // per_step

    def check_fills_a_step(self) -> None:
        """Refuse, before any work, a data set that cannot fill one step's batch."""
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.prompts)} training prompts are fewer than train.prompts_per_step={self.per_step}: "
                "one step's batch would repeat prompts (lower train.prompts_per_step or add data)"
            )

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def batch(self, step: int) -> list[Prompt]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)[index * self.per_step : (index + 1) * self.per_step]
        return [self.prompts[i] for i in order]


@dataclass
class RunParts:
    device: torch.device
    tokenizer: object
    train_prompts: list[Prompt]
    # Evaluation sets by name: {"eval": ...} for one data.eval_source, its names for a mapping.
    eval_sets: dict[str, list[Prompt]]
    policy: TreePolicy
    learner: Learner
    engine: RolloutEngine | None  # rank 0 only, unless rollout.every_rank
    schedule: BudgetSchedule
    reward: object
    eos_token_ids: list[int]
    sampler: PromptSampler
    rl_steps: int  # train.steps, or train.epochs passes of the sampler
    data_counts: dict
    context: Distributed = SINGLE_PROCESS
    # distributed, rank 0 (every rank with rollout.every_rank): unsharded weights for the engine and exports
    host_model: torch.nn.Module | None = None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but torch sees no CUDA device (use train.device=cpu or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prompt_limit(config: RunConfig, context: int, delimiters: Delimiters, server_tokens: int | None = None) -> int:
    """The longest prompt that leaves room for b_max thinking tokens and one summary branch.

    ``server_tokens``: the most prompt + new tokens the SGLang servers serve per request (their
    context length less 2); a set ``data.max_prompt_tokens`` must leave that room too.
    """
    branch = max(len(delimiters.truncated), len(delimiters.closed)) + config.rollout.summary_max_new_tokens
    if config.data.max_prompt_tokens is not None:
        room = None if server_tokens is None else server_tokens - config.method.b_max - branch
        if room is not None and config.data.max_prompt_tokens > room:
            raise ValueError(
                f"data.max_prompt_tokens={config.data.max_prompt_tokens} leaves no room for method.b_max="
                f"{config.method.b_max} and a summary branch of {branch} tokens in the {server_tokens} tokens the "
                f"SGLang servers serve per request (their context length less 2): set it to at most {room}"
            )
        return config.data.max_prompt_tokens
    if server_tokens is not None:
        context = min(context, server_tokens)
    limit = context - config.method.b_max - branch
    if limit < 1:
        raise ValueError(
            f"a context of {context} tokens holds no prompt next to method.b_max={config.method.b_max} and "
            f"a summary branch of {branch} tokens; lower method.b_max or rollout.summary_max_new_tokens"
        )
    return limit


def eval_set_sources(eval_source: str | dict | None) -> dict[str, str | None]:
    """``data.eval_source`` as ``{set name: source}``: a single source is the set ``eval``."""
    return dict(eval_source) if isinstance(eval_source, dict) else {"eval": eval_source}


def _prompts(
    config: RunConfig, tokenizer, run_dir: Path, max_prompt_tokens: int
) -> tuple[list[Prompt], dict[str, list[Prompt]], dict]:
    """Training prompts, evaluation prompts by set (``eval_set_sources``), and what was skipped
    (``data/...`` counts; ``data/eval_<set>_...`` for named sets)."""
    d = config.data
    eval_sets = eval_set_sources(d.eval_source)
    # The key of each set among the sources (and its data/<key>_* counts).
    keys = {name: f"eval_{name}" if isinstance(d.eval_source, dict) else name for name in eval_sets}
    sources = {"train": d.source, **{keys[name]: source for name, source in eval_sets.items()}}
    synthetic_eval = [name for name, source in sources.items() if name != "train" and source in (None, "synthetic")]
    if d.source == "synthetic" or synthetic_eval:
        from trainer.synthetic import generate_rows, save_rows

        s = d.synthetic
        options = dict(min_steps=s.min_steps, max_steps=s.max_steps, modulus=s.modulus, max_operand=s.max_operand,
                       max_multiplier=s.max_multiplier)  # fmt: skip
        if s.check_probs is not None:
            options["check_probs"] = tuple(s.check_probs)
        train_rows = generate_rows(s.num_train, seed=s.seed, **options) if d.source == "synthetic" else []
        if d.source == "synthetic":
            sources["train"] = str(save_rows(train_rows, run_dir / "data" / "train.jsonl"))
        if synthetic_eval:  # the synthetic held-out problems, none of them a training problem
            rows = generate_rows(s.num_eval, seed=s.seed + 1, exclude={row["problem"] for row in train_rows}, **options)
            sources.update(dict.fromkeys(synthetic_eval, str(save_rows(rows, run_dir / "data" / "eval.jsonl"))))
    text = {} if d.instruction is None else {"instruction": d.instruction}
    sets, skipped = {}, {}
    for name, source in sources.items():
        train = name == "train"  # the eval_* settings apply to every evaluation set
        loaded = load_prompts(
            DataConfig(source=source, max_prompt_tokens=max_prompt_tokens, limit=d.limit if train else d.eval_limit,
                       skip_bad_rows=d.skip_bad_rows, split=d.split if train else d.eval_split,
                       columns=dict((d.columns if train else d.eval_columns) or {}),
                       thinking_opener=d.thinking_opener, grader=config.reward.grader, **text),
            tokenizer,
        )  # fmt: skip
        if loaded.too_long and not d.skip_long_prompts:
            first = loaded.too_long[0]
            raise DataError(
                f"{first.source}: row {first.index} has a prompt longer than {max_prompt_tokens} tokens (and "
                f"{loaded.num_too_long - 1} more); set data.skip_long_prompts=true to skip them, or raise "
                "data.max_prompt_tokens"
            )
        sets[name] = loaded.prompts
        skipped[f"data/{name}_too_long"] = float(loaded.num_too_long)
        skipped[f"data/{name}_bad_rows"] = float(loaded.num_bad_rows)
        skipped[f"data/{name}_prompts"] = float(len(loaded.prompts))
    return sets["train"], {name: sets[key] for name, key in keys.items()}, skipped


def make_engine(
    config: RunConfig, model: torch.nn.Module, tokenizer, run_dir: Path, seed: int | None = None
) -> RolloutEngine:
    """The configured engine; ``seed`` (default ``train.seed``) seeds the embedded engine's sampling."""
    r = config.rollout
    eos = eos_token_ids(model, tokenizer)  # every EOS of the model's configs, as SGLang stops at them
    if r.engine == "embedded":
        seed = config.train.seed if seed is None else seed
        return EmbeddedEngine(model, tokenizer, max_batch_rows=r.max_batch_rows, seed=seed,
                              eos_token_ids=eos, kv_budget_tokens=r.kv_budget_tokens, kv_blocks=r.kv_blocks,
                              kv_memory_fraction=r.kv_memory_fraction, block_size=r.block_size,
                              sync_every=r.sync_every)  # fmt: skip
    if r.engine == "sglang":
        from trainer.rollout import SGLangEngine

        engine = SGLangEngine(
            r.urls, tokenizer, weights_dir=run_dir, timeout_s=r.request_timeout_s, max_retries=r.max_retries,
            backoff_s=r.retry_backoff_s, dp_size=r.dp_size, eos_token_ids=eos,
            sync_dtype=getattr(torch, r.weight_sync_dtype),
        )  # fmt: skip
        engine.server_info()  # at start: refuses a rollout.dp_size other than the servers' --dp-size
        if r.weight_sync == "distributed":
            host, _, port = r.weight_sync_master.rpartition(":")
            engine.init_weight_transfer(host, int(port), ranks_per_server=r.server_tp_size)
        return engine
    from trainer.rollout import SGLangInProcessEngine

    if config.model.path is None:
        raise ValueError("rollout.engine sglang_inprocess loads the model from model.path; a fresh model has none")
    return SGLangInProcessEngine(config.model.path, tokenizer, eos_token_ids=eos, colocate=r.colocate)


def rollout_dtype(setting: str, autocast_dtype: torch.dtype | None) -> torch.dtype | None:
    """``rollout.dtype`` as the dtype of the embedded engine's weights (None: keep the weights' own).

    ``auto`` samples in the learner's autocast dtype when it has one: the matmuls run in it anyway,
    SGLang serves in it, and it halves the engine's weights and K/V cache (decode reads every weight
    once per token). The learner recomputes the old log-probs itself, so the sampling dtype only
    moves the sampling distribution, as a bf16 inference server does.
    """
    if setting == "auto":
        return autocast_dtype
    if setting == "float32":
        return torch.float32
    if setting == "bfloat16":
        return torch.bfloat16
    raise ValueError(f"rollout.dtype must be auto, float32 or bfloat16, got {setting!r}")


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Cast ``model``'s floating-point parameters to ``dtype`` in place, one at a time (each old
    copy is freed as it goes; tied weights stay tied). Buffers keep their dtype: RoPE's
    ``inv_freq`` rounded to bf16 would move every position's angle."""
    if dtype is None:
        return
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point() and parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)


def norm_length(config: RunConfig, delimiters: Delimiters) -> int:
    """The ``*-norm`` divisor per trace: ``loss.norm_length`` when set (the R1 configs set the authors'
    10176), else one tree's longest response, ``b_max`` + every branch at its cap (longest inserted
    delimiter + summary cap): 10016 for R1-Distill-Qwen at b_max 8000, S=A=4, and 8126 for GRPO."""
    if config.loss.norm_length is not None:
        return config.loss.norm_length
    m = config.method
    branch = max(len(delimiters.truncated), len(delimiters.closed)) + config.rollout.summary_max_new_tokens
    return m.b_max + m.num_slots * m.num_summaries * branch


def build(config: RunConfig, run_dir: Path, *, resume: str | Path | None = None) -> RunParts:
    """All parts of a run, on the configured device; ``resume`` loads the weights of a checkpoint."""
    device = resolve_device(config.train.device)
    context = setup_distributed(device, config.train.dist_timeout_minutes)
    device = local_device(device)
    torch.manual_seed(config.train.seed)
    model_config = config.model
    if resume is not None:
        model_config = dataclasses.replace(
            model_config, path=str(resume), tokenizer="model", config=None, gguf_file=None
        )
    tokenizer = load_tokenizer(model_config)
    model = load_model(model_config, tokenizer, device, seed=config.train.seed)
    if model_config.dtype != "float32" and config.train.steps != 0:
        # AdamW moves a weight by about lr per step; bf16 resolves 2^-8 of its magnitude, so at
        # lr 1e-6 nearly every update of a bf16 weight rounds back to the weight.
        logger.warning(
            "model.dtype=%s: the learner updates %s parameters in place, and AdamW steps of about "
            "optim.lr=%g are below half a bf16 ulp of most weights, so they are lost; train with "
            "model.dtype=float32 and model.autocast=bfloat16 (fp32 weights, bf16 compute)",
            model_config.dtype, model_config.dtype, config.optim.lr,
        )  # fmt: skip
    model_context = int(getattr(model.config, "max_position_embeddings", 0) or 10**9)
    server_tokens = None
    if config.rollout.engine == "sglang":  # on every rank: each loads the prompts with this limit
        from trainer.rollout.sglang_info import request_token_limit

        r = config.rollout
        server_tokens = request_token_limit(r.urls, timeout_s=r.request_timeout_s, max_retries=r.max_retries,
                                            backoff_s=r.retry_backoff_s)  # fmt: skip
    limit = prompt_limit(config, model_context, Delimiters.from_tokenizer(tokenizer), server_tokens)
    train_prompts, eval_sets, data_counts = _prompts(config, tokenizer, run_dir, limit)
    for name, prompts in eval_sets.items():  # every rank stops here, none waits in a collective
        if not prompts:
            raise DataError(f"evaluation set {name!r} has no problem left to evaluate (see the data/eval_* counts)")
    autocast = model_config.autocast
    if autocast == "auto":
        autocast = "bfloat16" if device.type == "cuda" else None
    autocast_dtype = torch.bfloat16 if autocast == "bfloat16" else None
    engine, host_model = None, None
    if context.is_main or (config.rollout.every_rank and context.enabled):
        separate = config.rollout.engine == "embedded" or context.enabled
        rollout_model = copy.deepcopy(model).eval() if separate else model
        if separate and config.rollout.engine != "embedded":
            # Only a host for the gathered weights on their way to the servers: keep it off the GPU.
            rollout_model = rollout_model.cpu()
        if config.rollout.engine == "embedded":
            cast_parameters(rollout_model, rollout_dtype(config.rollout.dtype, autocast_dtype))
        # Engines of several ranks sample independent streams; rank 0's is the one-process stream.
        engine = make_engine(config, rollout_model, tokenizer, run_dir, seed=config.train.seed + context.rank)
        host_model = rollout_model if context.enabled else None
    policy = TreePolicy(
        model,
        attention_backend=model_config.attention_backend,
        gradient_checkpointing=model_config.gradient_checkpointing,
        autocast_dtype=autocast_dtype,
        micro_batch_tokens=config.train.micro_batch_tokens,
    )
    reference = None
    if config.loss.kl_coef > 0:
        reference_model = copy.deepcopy(model).requires_grad_(False)
        reference = TreePolicy(reference_model, attention_backend=model_config.attention_backend,
                               autocast_dtype=policy.autocast_dtype,
                               micro_batch_tokens=config.train.micro_batch_tokens)  # fmt: skip
    if context.enabled:
        param_dtype = fsdp_param_dtype(config.train.fsdp_param_dtype, policy.autocast_dtype)
        shard_policy(policy, param_dtype)
        if reference is not None:
            shard_policy(reference, param_dtype)
    t = config.train
    sampler = PromptSampler(train_prompts, t.prompts_per_step, t.seed)
    if t.steps != 0:
        sampler.check_fills_a_step()
    rl_steps = t.steps if t.steps is not None else t.epochs * sampler.steps_per_epoch
    updates_per_step = t.ppo_epochs * (t.prompts_per_step // t.ppo_mini_batch_prompts)
    optimizer, scheduler = make_optimizer(model, config.optim, total_steps=rl_steps * updates_per_step)
    learner = Learner(
        policy, optimizer, scheduler, config.loss,
        grad_clip=config.optim.grad_clip, norm_length=norm_length(config, Delimiters.from_tokenizer(tokenizer)),
        temperature=config.rollout.temperature, reference=reference, seed=t.seed,
        max_skipped_updates=t.max_skipped_updates, context=context,
    )  # fmt: skip
    m = config.method
    prior = m.prior if isinstance(m.prior, str) else tuple(m.prior)
    return RunParts(
        device=device,
        tokenizer=tokenizer,
        train_prompts=train_prompts,
        eval_sets=eval_sets,
        policy=policy,
        learner=learner,
        engine=engine,
        schedule=BudgetSchedule(m.b_max, m.num_slots, prior),
        reward=get_reward(config.rollout.reward, grader=config.reward.grader, timeout_s=config.reward.timeout_s),
        eos_token_ids=eos_token_ids(model, tokenizer),
        sampler=sampler,
        rl_steps=rl_steps,
        data_counts=data_counts,
        context=context,
        host_model=host_model,
    )
