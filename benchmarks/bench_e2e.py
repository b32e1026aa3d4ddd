"""One RL training step end to end (`ours`): wall time, trained tokens per second, seconds per phase.

Modes: `grpo` (S=1, A=1, base prior, v2only, grpo) and `ar` (S=A=4, linear prior, BRPO), the same
prompts, G and lengths, on the synthetic task with the embedded engine. Random-initialised models
(their traces mostly run to b_max, the worst case for rollout time). Metrics per mode:
`step_time_s`, `tokens_per_s` (packed tokens through the learner per second), `time_<phase>_s`
(think, summarize, score, advantages, update, sync), `packed_tokens`. Medians over the measured
steps, after one warm-up step (allocation, compilation).

CPU: the tiny demo model (192k parameters), b_max 128, 32 prompts x G=4. CUDA: a Qwen2.5-0.5B-shaped
config (24 layers, hidden 896, 14/2 heads), bf16, flex tree attention, b_max 256, 8 prompts x G=4,
summaries capped at 32 tokens (the first GPU run of b_max 512 x G=8 did not finish its GRPO
warm-up and two steps within 120 s: the embedded engine's decode is HF eager, one token per call).
"""

from __future__ import annotations

import statistics
import tempfile

from common import Results, environment_line, parse_args

from trainer.config import load_config
from trainer.loop import Trainer

MODES = {
    "grpo": ["method.preset=grpo"],
    "ar": ["method.preset=ar_linear", "method.num_summaries=4"],
}
CPU = [
    "model.config={hidden_size: 64, intermediate_size: 256, num_hidden_layers: 3, num_attention_heads: 4, "
    "num_key_value_heads: 2, max_position_embeddings: 1024, initializer_range: 0.15}",
    "method.b_max=128",
    "rollout.group_size=4",
    "rollout.summary_max_new_tokens=12",
    "train.prompts_per_step=32",
    "train.ppo_mini_batch_prompts=16",
    "train.micro_batch_tokens=512",
    "train.device=cpu",
]
CUDA = [
    "model.config={hidden_size: 896, intermediate_size: 4864, num_hidden_layers: 24, num_attention_heads: 14, "
    "num_key_value_heads: 2, max_position_embeddings: 4096}",
    "model.attention_backend=auto",
    "model.dtype=bfloat16",
    "model.gradient_checkpointing=true",
    "method.b_max=256",
    "rollout.group_size=4",
    "rollout.summary_max_new_tokens=32",
    "rollout.max_batch_rows=256",
    "train.prompts_per_step=8",
    "train.ppo_mini_batch_prompts=4",
    "train.micro_batch_tokens=32768",
    "train.device=cuda",
]
COMMON = [
    "model.tokenizer=synthetic",
    "data.synthetic={num_train: 256, num_eval: 4, modulus: 10, max_operand: 9, max_steps: 6}",
    "sft.steps=0",
    "optim.lr=1e-5",
    "logging.progress=false",
    "logging.tensorboard=false",
]


def main() -> None:
    args = parse_args("e2e", __doc__)
    device = args.device
    print(environment_line(device))
    results = Results("e2e", args.out)
    measured = 1 if args.quick else 2
    for mode, switches in MODES.items():
        overrides = [*COMMON, *(CUDA if device == "cuda" else CPU), *switches]
        config = load_config(None, overrides)
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(config, run_dir)
            trainer.rl_step(0)  # warm-up
            steps = [trainer.rl_step(step) for step in range(1, 1 + measured)]
            trainer.metrics.close()
        case = f"{mode}_bmax{config.method.b_max}_P{config.train.prompts_per_step}_G{config.rollout.group_size}"
        phases = sorted({key for step in steps for key in step if key.startswith("time/")})
        step_times = [sum(step[key] for key in phases) for step in steps]
        packed = statistics.median(step["rollout/packed_tokens"] for step in steps)
        results.add(case, "ours", "step_time_s", statistics.median(step_times), "s")
        results.add(case, "ours", "tokens_per_s", packed / statistics.median(step_times), "tok/s")
        results.add(case, "ours", "packed_tokens", packed, "count")
        for key in phases:
            name = key.removeprefix("time/").removesuffix("_s")
            results.add(case, "ours", f"time_{name}_s", statistics.median(step[key] for step in steps), "s")
    results.finish(args.out)


if __name__ == "__main__":
    main()
