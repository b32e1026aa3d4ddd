"""One RL training step end to end, ours against TRL's GRPOTrainer: wall time, tokens/s, phases.

Providers: `ours` (the trainer's `rl_step`) and, on CPU when `trl` imports (the `bench` extra), `trl`
(TRL's `GRPOTrainer` with transformers generation), side by side in one process on the same
random-initialised model, prompts, G, length caps and optimizer (AdamW, lr 1e-4, two optimizer
updates per step, no KL). Modes:

- `grpo`: S=1, A=1. Ours samples a thinking trace (<= b_max) then one summary (<= cap); TRL samples
  one completion of <= b_max + cap tokens.
- `ar`: S=A=4. Ours forks S*A summaries per trace from the cached prefix and trains one packed tree
  per trace. TRL can do the summaries only as extra completions without prefix sharing: its AR step
  is the GRPO step on the prompts, then a second GRPO step on every fork prompt
  (prompt + z[:c] + delimiter, from the same traces) with A completions each; each fork prompt is
  prefilled and trained as its own sequence.

Metrics per mode and provider: `step_time_s` (median over 4 measured steps, quick 1, after one warm-up step),
`tokens_per_s` (sampled tokens per second), `sampled_tokens`, and for ours `time_<phase>_s`
(think, summarize, score, advantages, update, sync) and `packed_tokens`. Random-initialised models
write long, mostly unclosed traces: the worst case for rollout time.

CPU: the tiny demo model (192k parameters), b_max 128, summary cap 12, 32 prompts x G=4. CUDA (ours
only): a Qwen2.5-0.5B-shaped config (24 layers, hidden 896, 14/2 heads) in the paper configs'
precision (fp32 weights, bf16 autocast, a bf16 rollout copy), flex tree attention, b_max 256,
8 prompts x G=4, summaries capped at 32 tokens.
"""

from __future__ import annotations

import copy
import importlib.util
import statistics
import tempfile
import time

from common import Results, environment_line, parse_args

from trainer.config import load_config
from trainer.data import format_prompt
from trainer.loop import Trainer
from trainer.synthetic import synthetic_reward

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
    "model.dtype=float32",  # the paper configs' precision: fp32 weights and AdamW, bf16 compute,
    "model.autocast=bfloat16",  # and the embedded engine samples from a bf16 copy (rollout.dtype auto)
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
    "optim.lr=1e-4",
    "logging.progress=false",
    "logging.tensorboard=false",
]


def run_ours(config, measured: int) -> tuple[list[dict], Trainer, dict]:
    """Metrics of ``measured`` RL steps after a warm-up step, the trainer, and its initial weights."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir)
        initial = copy.deepcopy(trainer.parts.policy.model.state_dict())
        trainer.rl_step(0)  # warm-up
        steps = [trainer.rl_step(step) for step in range(1, 1 + measured)]
        trainer.metrics.close()
    return steps, trainer, initial


def trl_generation_batches(model, tokenizer, prompts, answers, *, group_size, max_completion, batches) -> list[dict]:
    """Seconds and sampled tokens of each TRL generation batch (all ``prompts`` x ``group_size``
    completions, then two optimizer updates on them), for ``batches`` batches."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times = [time.perf_counter()]
            self.tokens = []

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if logs and "completions/mean_length" in logs:
                self.tokens.append(float(logs["completions/mean_length"]) * len(prompts) * group_size)

    def reward(prompts, completions, answer, **kwargs):
        return synthetic_reward(completions, answer)[0]

    completions = len(prompts) * group_size
    clock = StepClock()
    with tempfile.TemporaryDirectory() as output_dir:
        args = GRPOConfig(
            output_dir=output_dir, use_cpu=True, per_device_train_batch_size=completions // 2, steps_per_generation=2,
            num_generations=group_size, max_completion_length=max_completion, learning_rate=1e-4, beta=0.0,
            temperature=1.0, max_steps=2 * batches, logging_steps=1, save_strategy="no", report_to=[], bf16=False,
            dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False,
        )  # fmt: skip
        dataset = Dataset.from_list([{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)])
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[clock])  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # its per-step log dicts would bury the table
        trainer.train()
    times = [clock.times[i + 2] - clock.times[i] for i in range(0, 2 * batches, 2)]
    return [{"seconds": s, "tokens": t} for s, t in zip(times, clock.tokens, strict=False)]


def fork_prompts(trainer: Trainer, config, prompts, answers) -> tuple[list[str], list[str]]:
    """Every (trace, cut) summary prompt text of one AR step's thinking, from our engine's traces."""
    parts = trainer.parts
    traces = parts.engine.think([q.token_ids for q in prompts], config.rollout.group_size, config.method.b_max,
                                trainer.sampling)  # fmt: skip
    cuts = parts.schedule.cuts(traces.thinking_lens).tolist()
    texts, fork_answers = [], []
    for n, (prompt, thinking) in enumerate(zip(traces.prompt_ids, traces.thinking_ids, strict=True)):
        for cut in cuts[n]:
            inserted = parts.engine.delimiters.inserted(thinking, cut)
            texts.append(parts.tokenizer.decode(prompt + thinking[:cut] + list(inserted), skip_special_tokens=False))
            fork_answers.append(answers[n // config.rollout.group_size])
    return texts, fork_answers


def main() -> None:
    args = parse_args("e2e", __doc__)
    device = args.device
    print(environment_line(device))
    results = Results("e2e", args.out)
    measured = 1 if args.quick else 4
    with_trl = device == "cpu" and importlib.util.find_spec("trl") is not None
    if device == "cpu" and not with_trl:
        print("trl: not installed (pip install trl, the `bench` extra); no trl rows")
    for mode, switches in MODES.items():
        config = load_config(None, [*COMMON, *(CUDA if device == "cuda" else CPU), *switches])
        steps, trainer, initial = run_ours(config, measured)
        case = f"{mode}_bmax{config.method.b_max}_P{config.train.prompts_per_step}_G{config.rollout.group_size}"
        phases = sorted({key for step in steps for key in step if key.startswith("time/") and key != "time/step_s"})
        phases = [key for key in phases if key != "time/tokens_per_s"]
        step_time = statistics.median(sum(step[key] for key in phases) for step in steps)
        sampled = statistics.median(step["rollout/sampled_tokens"] for step in steps)
        results.add(case, "ours", "step_time_s", step_time, "s")
        results.add(case, "ours", "tokens_per_s", sampled / step_time, "tok/s")
        results.add(case, "ours", "sampled_tokens", sampled, "count")
        results.add(
            case, "ours", "packed_tokens", statistics.median(s["rollout/packed_tokens"] for s in steps), "count"
        )
        for key in phases:
            name = key.removeprefix("time/").removesuffix("_s")
            results.add(case, "ours", f"time_{name}_s", statistics.median(step[key] for step in steps), "s")
        if with_trl:
            add_trl_rows(results, case, mode, config, trainer, initial, measured)
    results.finish(args.out, notes=speedup_lines(results))


def add_trl_rows(results, case, mode, config, trainer, initial, measured) -> None:
    parts = trainer.parts
    model = copy.deepcopy(parts.engine.model)
    model.load_state_dict(initial)  # the same starting weights as ours
    prompts = parts.sampler.batch(0)
    texts = [format_prompt(q.problem.problem, parts.tokenizer) for q in prompts]
    answers = [q.answer[0] for q in prompts]
    cap = config.rollout.summary_max_new_tokens
    think_cap = config.method.b_max + (cap if mode == "grpo" else 0)
    batches = trl_generation_batches(model, parts.tokenizer, texts, answers, group_size=config.rollout.group_size,
                                     max_completion=think_cap, batches=1 + measured)[1:]  # fmt: skip
    seconds = statistics.median(b["seconds"] for b in batches)
    tokens = statistics.median(b["tokens"] for b in batches)
    if mode == "ar":
        fork_texts, fork_answers = fork_prompts(trainer, config, prompts, answers)
        forks = trl_generation_batches(model, parts.tokenizer, fork_texts, fork_answers,
                                       group_size=config.method.num_summaries, max_completion=cap,
                                       batches=1 + measured)[1:]  # fmt: skip
        seconds += statistics.median(b["seconds"] for b in forks)
        tokens += statistics.median(b["tokens"] for b in forks)
        results.add(case, "trl", "fork_prompts", len(fork_texts), "count")
    results.add(case, "trl", "step_time_s", seconds, "s")
    results.add(case, "trl", "tokens_per_s", tokens / seconds, "tok/s")
    results.add(case, "trl", "sampled_tokens", tokens, "count")


def speedup_lines(results: Results) -> list[str]:
    lines = []
    for mode, goal in (("grpo", 1.3), ("ar", 3.0)):
        case = next((row["case"] for row in results.rows if row["case"].startswith(mode + "_")), None)
        ours, trl = results.value(case, "ours", "step_time_s"), results.value(case, "trl", "step_time_s")
        if ours and trl:
            ratio = trl / ours
            lines.append(
                f"{case}: trl/ours step time = {ratio:.2f}x (goal >= {goal}x) {'met' if ratio >= goal else 'NOT met'}"
            )
    return lines


if __name__ == "__main__":
    main()
