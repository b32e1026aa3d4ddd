"""Run configs: YAML + dotted overrides, presets, and errors that name the key before any work."""

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
        (["train.steps=1.5"], r"train.steps: 1.5 is not an int"),
        (["method.prior=cubic"], r"method.prior: 'cubic' is not allowed; expected one of \('uniform'"),
        (["method.prior=[1, 2]"], "method.prior: .* expected 4 non-negative weights"),
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
        assert set(config.data.eval_source) == {"aime", "amc", "math500", "minerva"}
        assert all((ROOT / source).is_file() for source in config.data.eval_source.values()), config.data.eval_source


def test_describe_lists_every_key_with_help():
    lines = describe()
    assert any(line.startswith("method.num_summaries (int, default 4): A, summaries per budget slot") for line in lines)
    assert all(": " in line and line.split(": ", 1)[1] for line in lines)
