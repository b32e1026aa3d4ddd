"""A run's configuration: typed sections, loaded from YAML, then dotted overrides from the command line.

    anytime-train --config configs/tiny-cpu.yaml method.num_summaries=2 optim.lr=3e-4

A YAML file may start from another (``extends: other.yaml``, relative to the file) and name a
method preset (``method.preset: ar_linear``, from ``configs/paper_presets.yaml``): the preset
fills the method switches, and keys the file or the command line set win over it. Everything is
checked before any work starts: an unknown key, a wrong type or an invalid value raises
``ConfigError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from anytime_kernels.advantages import SUMMARY_METHODS, VARIANCE_REDUCTIONS
from trainer.budgets import PRIOR_PRESETS
from trainer.rewards.math_reward import GRADERS

PRESETS_PATH = Path(__file__).resolve().parent.parent / "configs" / "paper_presets.yaml"
AGGREGATIONS = ("token-sum-norm", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
ENGINES = ("embedded", "sglang", "sglang_inprocess")
REWARDS = ("synthetic", "math")


class ConfigError(ValueError):
    """A configuration key, type or value is not allowed; the message names the key."""


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    path: str | None = _help(
        "Hugging Face model folder (or GGUF folder with gguf_file); None builds from `config`", None
    )
    gguf_file: str | None = _help(
        "GGUF file: inside `path`, a full path, or package:NAME/file.gguf (needs gguf + accelerate)", None
    )
    config: dict | None = _help(
        "Qwen2Config keywords for a fresh random model (the tiny demo); vocab from the tokenizer", None
    )
    tokenizer: str = _help("'synthetic' (the task's local tokenizer) or 'model' (the one beside the weights)", "model")
    dtype: str = _help("parameter dtype: float32 or bfloat16", "float32")
    attention_backend: str = _help("tree attention: auto, flex, sdpa, flash_attn, xformers, reference_varlen", "auto")
    gradient_checkpointing: bool = _help("recompute decoder layers in backward (CUDA runs)", False)
    autocast: str | None = _help("bfloat16 autocast for the learner (None = off; default on for CUDA)", "auto")


@dataclass
class SyntheticDataConfig:
    num_train: int = _help("training problems generated", 4096)
    num_eval: int = _help("held-out problems generated (another seed)", 256)
    seed: int = _help("generator seed (eval uses seed + 1)", 0)
    min_steps: int = _help("fewest operations in a problem", 2)
    max_steps: int = _help("most operations in a problem", 8)
    modulus: int = _help("results are taken modulo this", 100)
    max_operand: int = _help("largest add/subtract operand", 99)
    max_multiplier: int = _help("largest multiplier", 9)
    check_probs: list[float] | None = _help("teacher verbosity mix: chance of a redundant check line per step", None)


@dataclass
class DataConfig:
    source: str = _help("'synthetic', or a JSON/JSONL/parquet file, a datasets folder, or a hub name", "synthetic")
    eval_source: str | dict | None = _help(
        "held-out problems for evaluation: one source, or {name: source} for several benchmarks, each "
        "evaluated and reported on its own besides their mean (None: the synthetic held-out set)", None)  # fmt: skip
    max_prompt_tokens: int | None = _help(
        "longest prompt (None: the model's context minus b_max and one summary branch)", None
    )
    skip_long_prompts: bool = _help("skip (and count) longer prompts; false: stop, naming the first one", True)
    skip_bad_rows: bool = _help("skip (and count) malformed rows; false: stop, naming the row", False)
    limit: int | None = _help("use the first N training problems", None)
    eval_limit: int | None = _help("use the first N evaluation problems", None)
    split: str = _help("split of a datasets source (train)", "train")
    eval_split: str = _help("split of a datasets eval_source", "train")
    columns: dict | None = _help(
        "train source columns by role, e.g. {problem: question, answer: final} (None: the known layouts)", None
    )
    eval_columns: dict | None = _help("the same for eval_source", None)
    instruction: str | None = _help(
        "appended to each problem (None: the authors' 'Let's think step by step and output the final answer "
        "within \\boxed{}.'; '': nothing)", None)  # fmt: skip
    thinking_opener: str | None = _help(
        "text after the chat template's generation prompt: auto (<think>\\n when the tokenizer has <think> "
        "and its template does not add it), a string, or null for nothing", "auto")  # fmt: skip
    synthetic: SyntheticDataConfig = _help("the synthetic task's generator", factory=SyntheticDataConfig)


@dataclass
class MethodConfig:
    preset: str | None = _help("a preset of configs/paper_presets.yaml: fills the switches below", None)
    b_max: int = _help("thinking budget b_max (largest support point)", 8000)
    num_slots: int = _help("S, budget support points b_s = b_max * s / S", 4)
    num_summaries: int = _help("A, summaries per budget slot", 4)
    prior: str | list[float] = _help("budget prior: uniform, linear, base, or S weights", "linear")
    variance_reduction: str = _help("thinking baseline: brpo, v1only, v2only, none", "brpo")
    summary_method: str = _help("summary advantages: brpo (all) or grpo (last summary of last slot)", "brpo")


@dataclass
class RolloutConfig:
    engine: str = _help("embedded (in-process HF + KV forks), sglang (HTTP servers), sglang_inprocess", "embedded")
    urls: list[str] = _help("SGLang server URLs (engine sglang)", factory=list)
    dp_size: int = _help("engine sglang: data-parallel replicas behind each URL (--dp-size); requests name theirs", 1)
    request_timeout_s: float = _help("engine sglang: read timeout of one request (a hung request is retried)", 3600.0)
    max_retries: int = _help("engine sglang: retries of a failed request, with exponential backoff", 4)
    retry_backoff_s: float = _help("engine sglang: first backoff between retries", 1.0)
    group_size: int = _help("G, thinking traces per prompt", 8)
    temperature: float = _help("sampling temperature of both phases", 1.0)
    top_p: float = _help("nucleus sampling threshold", 1.0)
    summary_max_new_tokens: int = _help("summary cap (the authors: 128 - 10 = 118)", 118)
    max_batch_rows: int = _help("embedded engine: sampled rows decoded together", 64)
    kv_budget_tokens: int | None = _help(
        "embedded engine: most tokens of cached traces kept for their forks (None: only the KV pool bounds "
        "them); past it, forks first, then the least recently used", None)  # fmt: skip
    kv_blocks: int | None = _help(
        "embedded engine: blocks of rollout.block_size tokens in its paged KV pool (None: on CUDA "
        "rollout.kv_memory_fraction of the free memory; on the CPU the pool grows as needed)", None)  # fmt: skip
    kv_memory_fraction: float = _help(
        "embedded engine on CUDA without rollout.kv_blocks: share of the GPU memory free at its first rollout "
        "that the KV pool takes for good (as SGLang's --mem-fraction-static; the learner's optimizer state "
        "comes later and needs the rest)", 0.4)  # fmt: skip
    block_size: int = _help("embedded engine: tokens per KV block (forks share the full blocks of a prefix)", 16)
    sync_every: int = _help(
        "embedded engine: decode steps between two reads of the sampled tokens back to the host (rows finish, "
        "leave and join the batch only then)", 16)  # fmt: skip
    dtype: str = _help(
        "embedded engine: dtype of its weight copy and K/V cache: auto (bfloat16 when the learner computes "
        "under bf16 autocast, as an SGLang server serves; else the weights' own), float32 or bfloat16", "auto")  # fmt: skip
    weight_sync: str = _help("engine sglang: disk (save + /update_weights_from_disk, a shared file system) or "
                             "distributed (broadcast over a process group the servers join)", "disk")  # fmt: skip
    weight_sync_master: str = _help("weight_sync distributed: host:port of this machine the servers can reach", "")
    weight_sync_dtype: str = _help(
        "engine sglang: dtype the weights travel in (bfloat16, float16, float32); servers cast to their own",
        "bfloat16")  # fmt: skip
    server_tp_size: int = _help("weight_sync distributed: tensor-parallel ranks per server", 1)
    colocate: bool = _help("engine sglang_inprocess: share the GPU with the learner (memory released during updates)",
                           False)  # fmt: skip
    every_rank: bool = _help(
        "engine embedded under torchrun: every rank rolls out (and evaluates) its share of the prompts on "
        "its own device (a full copy of the weights per rank) instead of rank 0 alone", False)  # fmt: skip
    stream_window: int = _help(
        "prompts (and evaluation problems) thinking at once while finished prompts' summary forks run "
        "(0: all); size it so the window's traces fit the engine's KV cache: the embedded engine holds "
        "at most two windows of traces", 0)  # fmt: skip
    reward: str = _help("reward by name: synthetic or math (or a registered one / module:function)", "synthetic")


@dataclass
class RewardConfig:
    grader: str = _help(
        "how rollout.reward=math compares answers: math-verify (equal values in any form), or authors (the "
        "authors' exact rule, to match their numbers: Hendrycks' MATH normalisation or their sympy check, the "
        "last \\boxed of any spelling must be \\boxed{...}, rows without an answer load and score 0; it rejects "
        "\\frac{2}{4} for \\frac{1}{2} and 1000 for 10^{3}; needs pylatexenc)", "math-verify")  # fmt: skip
    timeout_s: float | None = _help(
        "seconds one answer's comparison may run before it counts as wrong (None: the grader's own, 5 for "
        "math-verify, 10 for authors as in their code)", None)  # fmt: skip


@dataclass
class OptimConfig:
    lr: float = _help("AdamW learning rate", 1e-6)
    weight_decay: float = _help("AdamW weight decay (the authors keep verl's 0.01; the R1 configs set it)", 0.0)
    beta1: float = _help("AdamW beta1", 0.9)
    beta2: float = _help("AdamW beta2", 0.999)
    eps: float = _help("AdamW epsilon", 1e-8)
    grad_clip: float | None = _help("max gradient norm (None: no clipping)", 1.0)
    warmup_steps: int = _help("linear warm-up optimizer steps", 0)
    schedule: str = _help("learning rate after warm-up: constant, cosine, linear", "constant")


@dataclass
class LossConfig:
    clip_low: float = _help("PPO ratio clip below 1 (epsilon_low)", 0.2)
    clip_high: float = _help("PPO ratio clip above 1 (epsilon_high)", 0.2)
    dual_clip: float | None = _help("dual-clip constant c > 1 for negative advantages (None: off)", None)
    aggregation: str = _help(
        "token-sum-norm, token-mean, seq-mean-token-mean, seq-mean-token-sum-norm", "token-sum-norm"
    )
    norm_length: int | None = _help(
        "the *-norm divisor per trace: the mini-batch's token losses are summed and divided by traces x "
        "this constant. The authors use verl's data.max_response_length: 10176 in every b_max 8000 run "
        "(GRPO and A=1 ablations included; 18176 at 16000), which the R1 configs set. None: one tree's "
        "longest response, b_max + S*A*(longest delimiter + summary cap)", None)  # fmt: skip
    kl_coef: float = _help("weight of the KL to a frozen reference policy (0: no reference)", 0.0)
    kl_estimator: str = _help("k1, k2 or k3", "k3")
    entropy_coef: float = _help("entropy bonus weight", 0.0)


@dataclass
class TrainConfig:
    steps: int | None = _help("RL steps (null: train.epochs sets them)", 100)
    epochs: int | None = _help(
        "passes over the training prompts instead of train.steps (which must then be null): floor(prompts / "
        "prompts_per_step) steps per pass, the last incomplete batch dropped as verl's drop_last does (the "
        "authors train one epoch: about 629 steps of 64 of DeepScaleR's ~40.3k problems)", None)  # fmt: skip
    prompts_per_step: int = _help("prompts sampled per RL step", 64)
    ppo_mini_batch_prompts: int = _help("prompts per optimizer step", 32)
    ppo_epochs: int = _help("passes over a step's rollouts", 1)
    micro_batch_tokens: int = _help("packed tokens per learner micro-batch (whole trees)", 16384)
    seed: int = _help("seed of sampling, data order and initialisation", 0)
    device: str = _help("auto, cpu or cuda", "auto")
    save_every: int = _help("checkpoint every k steps (0: only at the end)", 0)
    keep_checkpoints: int = _help("periodic checkpoints kept (the newest; sft and final are always kept)", 3)
    max_skipped_updates: int = _help("stop the run after this many non-finite updates in a row", 10)
    dist_timeout_minutes: float = _help(
        "torchrun: limit of one collective (ranks > 0 wait in one while rank 0 rolls out and evaluates)", 180.0
    )
    fsdp_param_dtype: str = _help(
        "torchrun: dtype FSDP2 gathers and computes the weights in, gradients reduced in fp32 into fp32 "
        "shards: auto (bfloat16 under bf16 autocast, else the weights' own), float32, bfloat16",
        "auto",
    )
    stop_signals: list[str] = _help(
        "signals that stop the run at its next step boundary with a checkpoint (SIGUSR1, SIGUSR2, SIGTERM); "
        "SIGTERM keeps its default (end at once) unless listed, as torchrun ends the ranks left after a "
        "crash with it", factory=lambda: ["SIGUSR1"])  # fmt: skip


@dataclass
class SFTConfig:
    steps: int = _help("SFT warm-up optimizer steps on the data's solutions (0: none)", 0)
    batch_size: int = _help("sequences per SFT step", 32)
    lr: float = _help("SFT learning rate (AdamW, cosine decay to 10%)", 1e-3)
    warmup_steps: int = _help("SFT linear warm-up steps", 20)
    weight_decay: float = _help("SFT weight decay (matrices only)", 0.0)
    beta2: float = _help("SFT AdamW beta2", 0.999)


@dataclass
class EvalConfig:
    every: int = _help("evaluate every k RL steps (0: only before and after RL)", 0)
    budgets: list[int] | None = _help("eval budgets (None: the method's support points)", None)
    prior: str | list[float] = _help("weights of the anytime score over the eval budgets", "uniform")
    temperature: float = _help("sampling temperature at evaluation", 0.6)
    samples_per_problem: int = _help(
        "thinking samples per problem (the authors' final evaluation: 8, rollout.n x val_kwargs.n = 8 x 1)", 8
    )
    num_problems: int | None = _help("evaluate on the first N problems (None: all)", None)
    summary_max_new_tokens: int | None = _help("summary cap at evaluation (None: the rollout's)", None)
    periodic_sets: list[str] | None = _help(
        "named sets of data.eval_source that the periodic evaluations (eval.every) run on (None: all); the "
        "authors validate on AIME and AMC during training and on every set at the end", None)  # fmt: skip
    periodic_samples_per_problem: int | None = _help(
        "thinking samples per problem of the periodic evaluations (None: eval.samples_per_problem); the "
        "authors' training-time validation draws rollout.n x val_kwargs.n = 8 x 4 = 32", None)  # fmt: skip


@dataclass
class LoggingConfig:
    tensorboard: bool = _help("write TensorBoard events into the run folder", True)
    wandb: bool = _help("log to Weights & Biases when installed", False)
    wandb_project: str = _help("wandb project", "anytime-reasoning")
    progress: bool = _help("rich live display of the phases", True)


@dataclass
class RunConfig:
    name: str = _help("run name (the run folder's default name)", "run")
    model: ModelConfig = _help("the policy", factory=ModelConfig)
    data: DataConfig = _help("training and evaluation problems", factory=DataConfig)
    method: MethodConfig = _help("budgets and advantage switches", factory=MethodConfig)
    rollout: RolloutConfig = _help("sampling", factory=RolloutConfig)
    reward: RewardConfig = _help("math answer grading", factory=RewardConfig)
    optim: OptimConfig = _help("optimizer", factory=OptimConfig)
    loss: LossConfig = _help("policy loss", factory=LossConfig)
    train: TrainConfig = _help("RL schedule", factory=TrainConfig)
    sft: SFTConfig = _help("SFT warm-up", factory=SFTConfig)
    eval: EvalConfig = _help("anytime evaluation", factory=EvalConfig)
    logging: LoggingConfig = _help("metrics and progress", factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- loading ------------------------------------------------------------------------------------


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(key: str, value: Any, annotation) -> Any:
    """``value`` checked (and ints widened to floats) against ``annotation``; ConfigError otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as error:
                errors.append(str(error))
        allowed = " or ".join("null" if option is type(None) else _type_name(option) for option in options)
        raise ConfigError(f"{key}: {value!r} is not {allowed}")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {value!r} is not a list of {_type_name(item)}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} is not a mapping")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a bool (true/false)")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: {value!r} is not an int")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {value!r} is not a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: {value!r} is not a string")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'the config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = f"section {prefix!r}" if prefix else "the top level"
        raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; allowed: {names}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value or {}, key)
        else:
            kwargs[name] = _coerce(key, value, annotation)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict:
    """A config file's mapping, with ``extends:`` resolved (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    parent = values.pop("extends", None)
    if parent is not None:
        values = _deep_merge(read_yaml(path.parent / parent), values)
    return values


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (path, value parsed as YAML: numbers, bools, null, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from error
    return key.split("."), value


def method_presets(path: Path = PRESETS_PATH) -> dict[str, dict]:
    """The method presets (name -> switches) of ``configs/paper_presets.yaml``."""
    if not path.is_file():
        raise ConfigError(f"the method presets file {path} is missing (it ships in the repository's configs/)")
    presets = (yaml.safe_load(path.read_text()) or {}).get("presets", {})
    return {name: dict(values) for name, values in presets.items()}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """The run config of a YAML file (or the defaults) with ``section.key=value`` overrides applied."""
    values = read_yaml(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for part in keys[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    method = values.get("method") or {}
    preset = method.get("preset") if isinstance(method, dict) else None
    if preset is not None:
        presets = method_presets()
        if preset not in presets:
            raise ConfigError(f"method.preset: {preset!r} is not a preset; allowed: {sorted(presets)}")
        values["method"] = {**presets[preset], **method}
    config = _build(RunConfig, values, "")
    validate(config)
    return config


def _positive(value) -> bool:
    return value > 0


def _at_least(low):
    return lambda value: value >= low


def _below_one(value) -> bool:
    return 0 <= value < 1


# Settings with a bound of their own: dotted key -> (test of a set value, what is allowed). Unset
# (null) optional settings pass. Bounds that involve other settings are checked in ``validate``.
BOUNDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.max_prompt_tokens": (_at_least(1), ">= 1 tokens or null"),
    "data.limit": (_at_least(1), ">= 1 problems or null"),
    "data.eval_limit": (_at_least(1), ">= 1 problems or null"),
    "data.synthetic.num_train": (_at_least(1), ">= 1"),
    "data.synthetic.num_eval": (_at_least(1), ">= 1"),
    "data.synthetic.min_steps": (_at_least(1), ">= 1"),
    "data.synthetic.max_steps": (_at_least(1), ">= 1"),
    "data.synthetic.modulus": (_at_least(2), ">= 2"),
    "data.synthetic.max_operand": (_at_least(1), ">= 1"),
    "data.synthetic.max_multiplier": (_at_least(2), ">= 2 (a multiplier of 1 changes nothing)"),
    "data.synthetic.check_probs": (lambda probs: all(0 <= p <= 1 for p in probs), "probabilities in [0, 1]"),
    "method.num_slots": (_at_least(1), ">= 1"),
    "method.num_summaries": (_at_least(1), ">= 1"),
    "rollout.dp_size": (_at_least(1), ">= 1"),
    "rollout.request_timeout_s": (_positive, "> 0 seconds"),
    "rollout.max_retries": (_at_least(0), ">= 0"),
    "rollout.retry_backoff_s": (_at_least(0), ">= 0 seconds"),
    "rollout.group_size": (_at_least(1), ">= 1"),
    "rollout.temperature": (_positive, "> 0 (RL samples)"),
    "rollout.top_p": (lambda p: 0 < p <= 1, "in (0, 1]"),
    "rollout.summary_max_new_tokens": (_at_least(1), ">= 1"),
    "rollout.max_batch_rows": (_at_least(1), ">= 1"),
    "rollout.kv_budget_tokens": (_at_least(1), ">= 1 tokens or null"),
    "rollout.kv_blocks": (_at_least(1), ">= 1 blocks or null"),
    "rollout.kv_memory_fraction": (lambda f: 0 < f < 1, "in (0, 1)"),
    "rollout.block_size": (_at_least(1), ">= 1 tokens"),
    "rollout.sync_every": (_at_least(1), ">= 1 steps"),
    "rollout.server_tp_size": (_at_least(1), ">= 1"),
    "rollout.stream_window": (_at_least(0), ">= 0 prompts (0: all)"),
    "optim.lr": (_positive, "> 0"),
    "optim.weight_decay": (_at_least(0), ">= 0"),
    "optim.beta1": (_below_one, "in [0, 1)"),
    "optim.beta2": (_below_one, "in [0, 1)"),
    "optim.eps": (_positive, "> 0"),
    "optim.grad_clip": (_positive, "> 0 or null"),
    "optim.warmup_steps": (_at_least(0), ">= 0"),
    "loss.clip_low": (lambda eps: 0 < eps < 1, "in (0, 1)"),
    "loss.clip_high": (_positive, "> 0"),
    "loss.dual_clip": (lambda c: c > 1, "> 1 or null"),
    "loss.norm_length": (_at_least(1), ">= 1 or null"),
    "loss.kl_coef": (_at_least(0), ">= 0"),
    "loss.entropy_coef": (_at_least(0), ">= 0"),
    "train.steps": (_at_least(0), ">= 0 (or null with train.epochs)"),
    "train.epochs": (_at_least(1), ">= 1 (or null with train.steps)"),
    "train.prompts_per_step": (_at_least(1), ">= 1"),
    "train.ppo_epochs": (_at_least(1), ">= 1"),
    "train.micro_batch_tokens": (_at_least(1), ">= 1"),
    "train.save_every": (_at_least(0), ">= 0 steps (0: only at the end)"),
    "train.keep_checkpoints": (_at_least(1), ">= 1"),
    "train.max_skipped_updates": (_at_least(1), ">= 1"),
    "train.dist_timeout_minutes": (_positive, "> 0 minutes"),
    "sft.steps": (_at_least(0), ">= 0"),
    "sft.batch_size": (_at_least(1), ">= 1"),
    "sft.lr": (_positive, "> 0"),
    "sft.warmup_steps": (_at_least(0), ">= 0"),
    "sft.weight_decay": (_at_least(0), ">= 0"),
    "sft.beta2": (_below_one, "in [0, 1)"),
    "eval.every": (_at_least(0), ">= 0 steps (0: only before and after RL)"),
    "eval.temperature": (_at_least(0), ">= 0"),
    "eval.samples_per_problem": (_at_least(1), ">= 1"),
    "eval.num_problems": (_at_least(1), ">= 1 or null"),
    "eval.summary_max_new_tokens": (_at_least(1), ">= 1 or null"),
    "eval.periodic_samples_per_problem": (_at_least(1), ">= 1 or null"),
}


def _setting(config: RunConfig, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {allowed}")


def validate(config: RunConfig) -> None:
    """Value checks across sections (types were checked while loading)."""
    from trainer.attention import BACKEND_NAMES

    for key, (ok, allowed) in BOUNDS.items():
        value = _setting(config, key)
        _check(value is None or ok(value), key, value, allowed)  # None: an optional setting left unset
    m, r, o, lo, t, e = config.method, config.rollout, config.optim, config.loss, config.train, config.eval
    _check(m.b_max >= m.num_slots, "method.b_max", m.b_max, f">= method.num_slots ({m.num_slots})")
    if isinstance(m.prior, str):
        _check(m.prior in PRIOR_PRESETS, "method.prior", m.prior, f"one of {PRIOR_PRESETS} or a list of S weights")
    else:
        _check(len(m.prior) == m.num_slots and all(w >= 0 for w in m.prior) and sum(m.prior) > 0,
               "method.prior", m.prior, f"{m.num_slots} non-negative weights, not all zero")  # fmt: skip
    eval_budgets = len(e.budgets) if e.budgets is not None else m.num_slots
    if isinstance(e.prior, str):
        _check(e.prior in PRIOR_PRESETS, "eval.prior", e.prior, f"one of {PRIOR_PRESETS} or a list of weights")
    else:
        _check(len(e.prior) == eval_budgets and all(w >= 0 for w in e.prior) and sum(e.prior) > 0, "eval.prior",
               e.prior, f"{eval_budgets} non-negative weights (one per eval budget), not all zero")  # fmt: skip
    _check(m.variance_reduction in VARIANCE_REDUCTIONS, "method.variance_reduction", m.variance_reduction,
           f"one of {VARIANCE_REDUCTIONS}")  # fmt: skip
    _check(m.summary_method in SUMMARY_METHODS, "method.summary_method", m.summary_method, f"one of {SUMMARY_METHODS}")
    _check(r.engine in ENGINES, "rollout.engine", r.engine, f"one of {ENGINES}")
    _check(r.engine != "sglang" or bool(r.urls), "rollout.urls", r.urls, "at least one URL for engine sglang")
    _check(r.weight_sync_dtype in ("bfloat16", "float16", "float32"), "rollout.weight_sync_dtype",
           r.weight_sync_dtype, "bfloat16, float16 or float32")  # fmt: skip
    _check(r.dtype in ("auto", "float32", "bfloat16"), "rollout.dtype", r.dtype, "auto, float32 or bfloat16")
    _check(r.dtype == "auto" or r.engine == "embedded", "rollout.dtype", r.dtype,
           "auto unless rollout.engine is embedded (a server computes in its own --dtype; "
           "rollout.weight_sync_dtype sets the dtype the weights travel in)")  # fmt: skip
    _check(r.weight_sync in ("disk", "distributed"), "rollout.weight_sync", r.weight_sync, "disk or distributed")
    _check(r.weight_sync == "disk" or r.weight_sync_master.rpartition(":")[2].isdigit(), "rollout.weight_sync_master",
           r.weight_sync_master, "host:port (weight_sync distributed)")  # fmt: skip
    _check(not r.every_rank or r.engine == "embedded", "rollout.every_rank", r.every_rank,
           "false unless rollout.engine is embedded (SGLang servers serve every rank's requests already)")  # fmt: skip
    _check(config.model.dtype in ("float32", "bfloat16"), "model.dtype", config.model.dtype, "float32 or bfloat16")
    _check(config.model.tokenizer in ("synthetic", "model"), "model.tokenizer", config.model.tokenizer,
           "synthetic or model")  # fmt: skip
    _check(config.model.autocast in (None, "auto", "bfloat16"), "model.autocast", config.model.autocast,
           "null, auto or bfloat16")  # fmt: skip
    _check(config.model.attention_backend in BACKEND_NAMES, "model.attention_backend",
           config.model.attention_backend, f"one of {BACKEND_NAMES}")  # fmt: skip
    _check(config.model.path is not None or config.model.config is not None or config.model.gguf_file is not None,
           "model.path", config.model.path, "a model folder, model.gguf_file, or model.config for a fresh model")  # fmt: skip
    _check(o.schedule in ("constant", "cosine", "linear"), "optim.schedule", o.schedule, "constant, cosine or linear")
    _check(lo.aggregation in AGGREGATIONS, "loss.aggregation", lo.aggregation, f"one of {AGGREGATIONS}")
    _check(lo.kl_estimator in KL_ESTIMATORS, "loss.kl_estimator", lo.kl_estimator, f"one of {KL_ESTIMATORS}")
    _check((t.steps is None) != (t.epochs is None), "train.steps", t.steps,
           f"exactly one of train.steps and train.epochs (now {t.epochs!r}) to set the run's length; "
           "set the other to null")  # fmt: skip
    _check(1 <= t.ppo_mini_batch_prompts <= t.prompts_per_step and t.prompts_per_step % t.ppo_mini_batch_prompts == 0,
           "train.ppo_mini_batch_prompts", t.ppo_mini_batch_prompts,
           f"a divisor of train.prompts_per_step ({t.prompts_per_step})")  # fmt: skip
    _check(t.device in ("auto", "cpu", "cuda"), "train.device", t.device, "auto, cpu or cuda")
    _check(set(t.stop_signals) <= {"SIGUSR1", "SIGUSR2", "SIGTERM"}, "train.stop_signals", t.stop_signals,
           "a list of SIGUSR1, SIGUSR2, SIGTERM")  # fmt: skip
    _check(t.fsdp_param_dtype in ("auto", "float32", "bfloat16"), "train.fsdp_param_dtype", t.fsdp_param_dtype,
           "auto, float32 or bfloat16")  # fmt: skip
    sets = config.data.eval_source
    if isinstance(sets, dict):
        _check(bool(sets) and all(isinstance(v, str) and v for v in sets.values())
               and all(isinstance(k, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", k) for k in sets),
               "data.eval_source", sets,
               "a source, or a non-empty mapping of set names (letters, digits, _ . -) to sources")  # fmt: skip
    for key in ("columns", "eval_columns"):
        mapping = getattr(config.data, key) or {}
        _check(set(mapping) <= {"problem", "answer", "solution"} and all(isinstance(v, str) for v in mapping.values()),
               f"data.{key}", mapping, "a mapping of problem/answer/solution to column names")  # fmt: skip
    if e.periodic_sets is not None:
        named = sorted(sets) if isinstance(sets, dict) else []
        _check(bool(e.periodic_sets) and set(e.periodic_sets) <= set(named), "eval.periodic_sets", e.periodic_sets,
               f"a non-empty list of the set names of data.eval_source ({named or 'not a mapping of sets'})")  # fmt: skip
    if e.budgets is not None:
        _check(len(e.budgets) >= 1 and all(0 < b <= m.b_max for b in e.budgets) and e.budgets == sorted(set(e.budgets)),
               "eval.budgets", e.budgets, f"increasing budgets in (0, method.b_max={m.b_max}]")  # fmt: skip
    d = config.data.synthetic
    _check(1 <= d.min_steps <= d.max_steps, "data.synthetic.min_steps", d.min_steps,
           f"1 <= min_steps <= max_steps ({d.max_steps})")  # fmt: skip
    _check(r.reward in REWARDS or ":" in r.reward or r.reward.isidentifier(), "rollout.reward", r.reward,
           f"one of {REWARDS}, a registered name or module:function")  # fmt: skip
    g = config.reward
    _check(g.grader in GRADERS, "reward.grader", g.grader, f"one of {GRADERS}")
    _check(g.timeout_s is None or g.timeout_s > 0, "reward.timeout_s", g.timeout_s, "> 0 seconds or null")
    _check(g.grader == "math-verify" or r.reward == "math", "reward.grader", g.grader,
           f"math-verify unless rollout.reward is math (it is {r.reward!r})")  # fmt: skip
    _check(g.timeout_s is None or r.reward == "math", "reward.timeout_s", g.timeout_s,
           f"null unless rollout.reward is math (it is {r.reward!r})")  # fmt: skip


def describe(cls=RunConfig, prefix: str = "") -> list[str]:
    """One line per key with its type, default and help (``anytime-train --help-config``)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        key = f"{prefix}{item.name}"
        annotation = hints[item.name]
        if dataclasses.is_dataclass(annotation):
            lines.extend(describe(annotation, key + "."))
            continue
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        lines.append(f"{key} ({_type_name(annotation)}, default {default!r}): {item.metadata.get('help', '')}")
    return lines
