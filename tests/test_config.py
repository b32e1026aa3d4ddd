"""Run configs: YAML + dotted overrides, presets, and errors that name the key before any work."""

import re
from pathlib import Path

import pytest

from trainer.config import ConfigError, RunConfig, describe, load_config, method_presets

ROOT = Path(__file__).resolve().parent.parent
FRESH = "model.config={hidden_size: 32}"

# ARCHITECTURE.md's presets: (S, A, prior, variance_reduction, summary_method).
PAPER = {
    "grpo": (1, 1, "base", "v2only", "grpo"),
    "ar_linear": (4, 4, "linear", "brpo", "brpo"),
    "ar_uniform": (4, 4, "uniform", "brpo", "brpo"),
    "ar_base": (4, 4, "base", "brpo", "brpo"),
    "grpo_linear": (4, 1, "linear", "v2only", "grpo"),
    "grpo_decouple": (4, 4, "base", "v2only", "brpo"),
    "grpo_vr": (4, 1, "base", "brpo", "grpo"),
    "grpo_vr_decouple": (4, 4, "base", "brpo", "brpo"),
}


def test_presets_are_the_papers():
    presets = method_presets()
    assert set(presets) == set(PAPER)
    for name, (slots, summaries, prior, reduction, method) in PAPER.items():
        config = load_config(None, [FRESH, f"method.preset={name}"]).method
        assert (config.num_slots, config.num_summaries, config.prior, config.variance_reduction,
                config.summary_method) == (slots, summaries, prior, reduction, method), name  # fmt: skip


def test_explicit_keys_win_over_the_preset_and_overrides_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {config: {hidden_size: 32}}\nmethod: {preset: ar_linear, num_summaries: 2}\noptim: {lr: 0.1}\n"
    )
    config = load_config(path, ["optim.lr=3e-4", "rollout.urls=[http://a:1, http://b:2]"])
    assert config.method.num_summaries == 2 and config.method.prior == "linear"
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.rollout.urls == ["http://a:1", "http://b:2"]


def test_extends_merges_the_parent(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {config: {hidden_size: 32}}\ntrain: {steps: 7, seed: 3}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain: {steps: 9}\n")
    config = load_config(tmp_path / "child.yaml")
    assert (config.train.steps, config.train.seed) == (9, 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], r"unknown key optim.lrr in section 'optim'; allowed: \['lr'"),
        (["optimizer.lr=1"], "unknown key optimizer in the top level"),
        (["optim.lr=fast"], "optim.lr: 'fast' is not a number"),
        (["train.steps=1.5"], r"train.steps: 1.5 is not int or null"),
        (["method.prior=cubic"], r"method.prior: 'cubic' is not allowed; expected one of \('uniform'"),
        (["method.prior=[1, 2]"], "method.prior: .* expected 4 non-negative weights"),
        (["eval.prior=[1, 2]"], r"eval.prior: .* expected 4 non-negative weights \(one per eval budget\)"),
        (["eval.budgets=[4000, 8000]", "eval.prior=[0, 0]"], "eval.prior: .* not all zero"),
        (["eval.prior=steep"], r"eval.prior: 'steep' is not allowed; expected one of \('uniform'"),
        (["train.epochs=1"], "exactly one of train.steps and train.epochs"),
        (["train.steps=null"], "exactly one of train.steps and train.epochs"),
        (["train.ppo_mini_batch_prompts=5"], r"a divisor of train.prompts_per_step \(64\)"),
        (["loss.aggregation=sum"], "loss.aggregation: 'sum' is not allowed"),
        (["method.preset=ar_fancy"], r"method.preset: 'ar_fancy' is not a preset; allowed: \['ar_base'"),
        (["optim.lr"], r"override 'optim.lr' must look like section.key=value"),
        (["optim..lr=1"], "must look like section.key=value"),
        (["optim=3"], "optim: expected a mapping of keys, got 3"),
        (["model.attention_backend=cudnn"], "model.attention_backend: 'cudnn' is not allowed"),
        (["logging.tensorboard=maybe"], "logging.tensorboard: 'maybe' is not a bool"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [FRESH, *overrides])


def test_a_model_is_required_and_files_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.path: None is not allowed; expected a model folder"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(tmp_path / "list.yaml")


RUN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "paper_presets.yaml")


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_run_config_loads(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    if path.name.startswith("r1-distill-qwen-1.5b"):
        assert config.method.b_max == 8000 and config.rollout.engine == "sglang" and config.rollout.reward == "math"
        # The evaluation sets are read relative to the directory the run starts in: the checkout.
        # OlympiadBench is the authors' file, not in this workspace: it is named beside the others.
        sets = config.data.eval_source
        assert set(sets) == {"aime", "amc", "math500", "minerva", "olympiad_bench"}
        assert {Path(source).parent for source in sets.values()} == {Path("../shared/data/math-eval")}, sets
        if (ROOT / "../shared/data/math-eval").is_dir():  # the workspace's copy; a user's clone has none
            assert all((ROOT / source).is_file() for name, source in sets.items() if name != "olympiad_bench"), sets
        # The authors' setup (issue 26): their divisor, weight decay, one epoch, evaluation plan.
        assert (config.loss.norm_length, config.optim.weight_decay) == (10176, 0.01)
        assert (config.train.steps, config.train.epochs, config.train.ppo_epochs) == (None, 1, 1)
        assert (config.eval.every, config.eval.periodic_sets, config.eval.periodic_samples_per_problem) == (
            20, ["aime", "amc"], 32)  # fmt: skip
        assert config.eval.samples_per_problem == 8 and config.train.save_every == config.eval.every


def test_describe_lists_every_key_with_help():
    lines = describe()
    assert any(line.startswith("method.num_summaries (int, default 4): A, summaries per budget slot") for line in lines)
    assert all(": " in line and line.split(": ", 1)[1] for line in lines)


# Every numeric setting with a bound: (key, refused values, an accepted boundary value). A value is
# refused with a ConfigError that names its key (before any work starts).
BOUNDED = [
    ("data.max_prompt_tokens", [0], 1),
    ("data.limit", [0], 1),
    ("data.eval_limit", [0], 1),
    ("data.synthetic.num_train", [0], 1),
    ("data.synthetic.num_eval", [0], 1),
    ("data.synthetic.min_steps", [0], 1),
    ("data.synthetic.max_steps", [0], 8),
    ("data.synthetic.modulus", [1, 0], 2),
    ("data.synthetic.max_operand", [0], 1),
    ("data.synthetic.max_multiplier", [0, 1], 2),
    ("data.synthetic.check_probs", [[-0.1], [1.5]], [0.0, 1.0]),
    ("method.b_max", [3, 0], 4),
    ("method.num_slots", [0], 1),
    ("method.num_summaries", [0], 1),
    ("rollout.dp_size", [0], 1),
    ("rollout.request_timeout_s", [0, -1], 0.5),
    ("rollout.max_retries", [-1], 0),
    ("rollout.retry_backoff_s", [-0.5], 0.0),
    ("rollout.group_size", [0], 1),
    ("rollout.temperature", [0, -1], 0.1),
    ("rollout.top_p", [0, 1.5], 1.0),
    ("rollout.summary_max_new_tokens", [0], 1),
    ("rollout.max_batch_rows", [0], 1),
    ("rollout.kv_budget_tokens", [0], 1),
    ("rollout.kv_blocks", [0], 1),
    ("rollout.kv_memory_fraction", [0.0, 1.0], 0.5),
    ("rollout.block_size", [0], 1),
    ("rollout.sync_every", [0], 1),
    ("rollout.server_tp_size", [0], 1),
    ("rollout.stream_window", [-1], 0),
    ("optim.lr", [0, -1e-6], 1e-9),
    ("optim.weight_decay", [-0.01], 0.0),
    ("optim.beta1", [-0.1, 1.0], 0.0),
    ("optim.beta2", [-0.1, 1.0], 0.0),
    ("optim.eps", [0, -1e-8], 1e-12),
    ("optim.grad_clip", [0, -1], 0.1),
    ("optim.warmup_steps", [-1], 0),
    ("loss.clip_low", [0, -0.2, 1.0], 0.999),
    ("loss.clip_high", [0, -0.2], 0.01),
    ("loss.dual_clip", [1.0, 0.5], 1.01),
    ("loss.norm_length", [0], 1),
    ("loss.kl_coef", [-0.1], 0.0),
    ("loss.entropy_coef", [-0.1], 0.0),
    ("train.steps", [-1], 0),
    ("train.prompts_per_step", [0, -1], 32),  # 32: a multiple of the default mini-batch
    ("train.ppo_epochs", [0, -1], 1),
    ("train.micro_batch_tokens", [0], 1),
    ("train.save_every", [-1], 0),
    ("train.keep_checkpoints", [0], 1),
    ("train.max_skipped_updates", [0], 1),
    ("train.dist_timeout_minutes", [0], 0.5),
    ("sft.steps", [-1], 0),
    ("sft.batch_size", [0], 1),
    ("sft.lr", [0], 1e-9),
    ("sft.warmup_steps", [-1], 0),
    ("sft.weight_decay", [-0.1], 0.0),
    ("sft.beta2", [-0.1, 1.0], 0.0),
    ("eval.every", [-1], 0),
    ("eval.temperature", [-0.1], 0.0),
    ("eval.samples_per_problem", [0], 1),
    ("eval.num_problems", [0], 1),
    ("eval.summary_max_new_tokens", [0], 1),
    ("eval.periodic_samples_per_problem", [0], 1),
]
# Numeric settings any value of which is fine.
UNBOUNDED = {"data.synthetic.seed", "train.seed"}
# Bounded by other settings (tested with their own messages): a divisor, a range of the method's budgets,
# the other half of the run's length, a math reward's timeout (> 0; tests/test_rewards_authors.py).
CROSS_CHECKED = {"train.ppo_mini_batch_prompts", "eval.budgets", "eval.prior", "method.prior", "train.epochs",
                 "reward.timeout_s"}  # fmt: skip


def _numeric_keys(cls=RunConfig, prefix=""):
    import dataclasses
    import typing

    keys = []
    for item in dataclasses.fields(cls):
        annotation = typing.get_type_hints(cls)[item.name]
        if dataclasses.is_dataclass(annotation):
            keys += _numeric_keys(annotation, f"{prefix}{item.name}.")
        elif annotation is not bool and (
            {int, float} & set(typing.get_args(annotation) or (annotation,)) or "float]" in str(annotation)
        ):
            keys.append(f"{prefix}{item.name}")
    return keys


def test_every_numeric_setting_is_bounded_or_named_unbounded():
    named = {key for key, _, _ in BOUNDED} | UNBOUNDED | CROSS_CHECKED
    assert sorted(set(_numeric_keys()) - named) == [], "add the new numeric settings to BOUNDED (and check them)"


@pytest.mark.parametrize(("key", "refused", "accepted"), BOUNDED, ids=[row[0] for row in BOUNDED])
def test_a_value_out_of_bounds_is_refused_by_name(key, refused, accepted):
    import yaml

    for value in refused:
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(None, [FRESH, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
    config = load_config(None, [FRESH, f"{key}={yaml.safe_dump(accepted, default_flow_style=True).strip()}"])
    section, _, name = key.rpartition(".")
    node = config
    for part in section.split("."):
        node = getattr(node, part)
    assert getattr(node, name) == accepted
