"""A long run survives being killed, and faults end a step cleanly: crash-safe resume, engine
failures, non-finite updates, equal rewards, bad data."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures.rewards import LENGTH_REWARD
from safetensors.torch import load_file
from test_trainer import TINY

from anytime_kernels import brpo_advantages
from trainer.checkpoint import latest_checkpoint, prune_checkpoints
from trainer.components import PromptSampler
from trainer.config import ConfigError, load_config
from trainer.data import DataError
from trainer.loop import Trainer
from trainer.models import load_model
from trainer.rollout import EmbeddedEngine, SGLangServerError
from trainer.rollout.testing import ProtocolServer

RUN = [*TINY, "train.steps=5", "train.save_every=1", "logging.tensorboard=false", "rollout.reward=length_reward:reward"]


def train_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "--out", str(out), *RUN, *extra]


def train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "train/loss" in line]


def test_a_killed_run_resumes_to_the_parameters_of_an_uninterrupted_one(tmp_path):
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).resolve().parent.parent}:{tmp_path}"}
    subprocess.run([*train_command(tmp_path / "whole")], check=True, env=env, capture_output=True, timeout=600)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        train_command(interrupted), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill it once step 2 is logged: in step 3 or writing step 2's checkpoint
        if (interrupted / "metrics.jsonl").exists() and 2 in train_steps(interrupted):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 5 not in train_steps(interrupted), "the run finished before it could be killed"
    # A checkpoint torn by a kill mid-write is only a .partial folder (the rename is the commit).
    torn = interrupted / "checkpoints" / "step9.partial"
    torn.mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"torn")
    (torn / "trainer_state.json").write_text(json.dumps({"step": 9}))  # written before the kill
    assert latest_checkpoint(interrupted / "checkpoints").name in {"step1", "step2", "step3", "step4"}

    subprocess.run([*train_command(interrupted), "--resume", "auto"], check=True, env=env, capture_output=True,
                   timeout=600)  # fmt: skip
    assert train_steps(interrupted) == [1, 2, 3, 4, 5]  # every step logged exactly once
    whole = load_file(tmp_path / "whole" / "checkpoints" / "final" / "model.safetensors")
    resumed = load_file(interrupted / "checkpoints" / "final" / "model.safetensors")
    start = load_file(tmp_path / "whole" / "checkpoints" / "sft" / "model.safetensors")
    assert any(not torch.equal(whole[name], start[name]) for name in whole), "RL changed nothing: a vacuous test"
    for name, tensor in whole.items():
        assert torch.equal(resumed[name], tensor), name
    kept = sorted(p.name for p in (interrupted / "checkpoints").iterdir() if p.name.startswith("step"))
    assert kept == ["step3", "step4", "step5", "step9.partial"]  # train.keep_checkpoints=3


def test_a_stop_signal_ends_the_step_with_a_checkpoint_that_resumes_like_an_uninterrupted_run(tmp_path):
    """SIGUSR1 (what a cluster sends before preempting): the run finishes its RL step, saves it as
    a checkpoint although train.save_every would not, exits 128 + 10 naming it, and --resume auto
    reaches the uninterrupted run's parameters (a second signal: the native-call test below)."""
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).resolve().parent.parent}:{tmp_path}"}
    no_periodic = ["train.save_every=0", "train.steps=4"]
    subprocess.run(train_command(tmp_path / "whole", *no_periodic), check=True, env=env, capture_output=True,
                   timeout=600)  # fmt: skip

    def start_and_signal(run_dir):
        process = subprocess.Popen(train_command(run_dir, *no_periodic), env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not ((run_dir / "metrics.jsonl").exists() and 1 in train_steps(run_dir)):
            time.sleep(0.02)
        process.send_signal(signal.SIGUSR1)
        out, err = process.communicate(timeout=300)
        return process.returncode, out, err

    stopped = tmp_path / "stopped"
    code, out, err = start_and_signal(stopped)
    assert code == 128 + signal.SIGUSR1, err[-2000:]
    steps = train_steps(stopped)
    assert steps == list(range(1, len(steps) + 1)) and 1 <= steps[-1] <= 4, steps
    assert f"stopped on SIGUSR1 after RL step {steps[-1]}" in out and "--resume auto" in out
    checkpoints = sorted(p.name for p in (stopped / "checkpoints").iterdir())
    assert checkpoints == ["sft", f"step{steps[-1]}"], checkpoints
    subprocess.run([*train_command(stopped, *no_periodic), "--resume", "auto"], check=True, env=env,
                   capture_output=True, timeout=600)  # fmt: skip
    assert train_steps(stopped) == [1, 2, 3, 4]
    # The resumed process did not evaluate the SFT model: its report reads that evaluation back.
    reports = [(run / "report.md").read_text().splitlines() for run in (tmp_path / "whole", stopped)]
    assert (
        [line for line in reports[1] if line.startswith("| sft |")]
        == [line for line in reports[0] if line.startswith("| sft |")]
        != []
    )
    assert any(line.startswith("Anytime score sft -> final") for line in reports[1])
    whole = load_file(tmp_path / "whole" / "checkpoints" / "final" / "model.safetensors")
    resumed = load_file(stopped / "checkpoints" / "final" / "model.safetensors")
    for name, tensor in whole.items():
        assert torch.equal(resumed[name], tensor), name


def record_evaluations(monkeypatch) -> list[str]:
    """From now on ``Trainer.evaluate`` appends the name of each evaluation it runs to the list returned."""
    evaluated = []
    original = Trainer.evaluate

    def recording(self, name, step):
        evaluated.append(name)
        return original(self, name, step)

    monkeypatch.setattr(Trainer, "evaluate", recording)
    return evaluated


def signal_self_during(monkeypatch, cls, method: str) -> None:
    """Send this process SIGUSR1 while ``cls.method`` runs (once), as a cluster would."""
    original = getattr(cls, method)

    def signalled(self, *args, **kwargs):
        monkeypatch.setattr(cls, method, original)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)  # the watcher thread sees the signal while the method still runs
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, signalled)


def test_a_stop_signal_during_sft_stops_after_its_checkpoint_and_one_on_the_last_step_before_the_final_eval(
    tmp_path, monkeypatch
):
    """A signal during the SFT warm-up stops the run once the SFT checkpoint is written, before
    the SFT evaluation; one during the last RL step saves that step before the (long) final
    evaluation, which runs when the run resumes."""
    from trainer.stopping import RunStopped

    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config(None, [*RUN, "train.steps=2", "train.save_every=0"])
    signal_self_during(monkeypatch, Trainer, "_sft")
    with pytest.raises(RunStopped, match="stopped on SIGUSR1 after RL step 0") as stopped:
        Trainer(config, tmp_path / "run").run()
    assert stopped.value.checkpoint == tmp_path / "run" / "checkpoints" / "sft"
    assert not (tmp_path / "run" / "eval").exists()

    resumed = Trainer(config, tmp_path / "run", resume="auto")
    real_step = resumed.rl_step

    def last_step_signalled(step):
        if step == 1:  # the last of train.steps=2
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.2)
        return real_step(step)

    resumed.rl_step = last_step_signalled
    with pytest.raises(RunStopped, match="after RL step 2"):
        resumed.run()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["sft", "step2"]
    assert sorted(p.name for p in (tmp_path / "run" / "eval").iterdir()) == ["sft.json"]  # evaluated on resume
    final = Trainer(config, tmp_path / "run", resume="auto")
    assert final.start_step == 2
    evaluations = final.run()
    assert set(evaluations) == {"final"} and (checkpoints / "final").is_dir()
    assert train_steps(tmp_path / "run") == [1, 2]


SECOND_SIGNAL_CHILD = """
import time, torch
from trainer.stopping import StopSignals
torch.set_num_threads(1)
left, right = torch.randn(6000, 6000), torch.randn(6000, 6000)
with StopSignals(["SIGTERM", "SIGUSR1"]):
    print("ready", flush=True)
    torch.mm(left, right)  # seconds inside one native call: Python runs no handler meanwhile
    print("native call done", flush=True)
"""


def test_a_second_signal_ends_a_process_blocked_in_a_native_call(tmp_path):
    """Python runs signal handlers between bytecodes only, where two signals can arrive as one:
    the watcher thread sees each signal as it arrives, so the second one ends the process while
    its main thread is still inside a long native call."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    process = subprocess.Popen([sys.executable, "-c", SECOND_SIGNAL_CHILD], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "native call done" not in out
    assert "SIGTERM again: stopping now" in err


def test_prompts_are_consumed_once_per_epoch_and_the_incomplete_batch_is_dropped():
    prompts = list(range(10))
    sampler = PromptSampler(prompts, per_step=4, seed=3)
    assert sampler.steps_per_epoch == 2  # 8 of the 10 prompts per epoch, as verl's drop_last
    epochs = [[p for step in (2 * e, 2 * e + 1) for p in sampler.batch(step)] for e in range(3)]
    for drawn in epochs:
        assert len(set(drawn)) == 8 and set(drawn) <= set(prompts)
    assert epochs[0] != epochs[1]  # another shuffle per epoch
    assert sampler.batch(3) == PromptSampler(prompts, per_step=4, seed=3).batch(3)  # a function of (seed, step)
    with pytest.raises(ValueError, match=r"3 training prompts are fewer than train\.prompts_per_step=4"):
        PromptSampler(prompts[:3], per_step=4, seed=0).check_fills_a_step()


def test_latest_checkpoint_and_pruning(tmp_path):
    for step in (1, 2, 3, 4):
        folder = tmp_path / f"step{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    (tmp_path / "step7").mkdir()  # no trainer_state.json: incomplete
    torn = tmp_path / "step9.partial"  # killed before its rename: not a checkpoint, whatever it holds
    torn.mkdir()
    (torn / "trainer_state.json").write_text(json.dumps({"step": 9}))
    assert latest_checkpoint(tmp_path) == tmp_path / "step4"
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step1", "step2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step3", "step4", "step7", "step9.partial"]
    assert latest_checkpoint(tmp_path / "missing") is None


def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    trainer = Trainer(load_config(None, [*TINY, "train.max_skipped_updates=3"]), tmp_path)
    learner = trainer.parts.learner
    before = {n: p.detach().clone() for n, p in trainer.parts.policy.model.named_parameters()}
    import trainer.learner as learner_module

    real = learner_module.policy_loss

    def nan_loss(*args, **kwargs):
        terms = real(*args, **kwargs)
        terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(learner_module, "policy_loss", nan_loss)
    metrics = trainer.rl_step(0)  # two updates, both skipped
    assert metrics["train/skipped_updates"] == 2.0
    for name, parameter in trainer.parts.policy.model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    with pytest.raises(FloatingPointError, match="3 updates in a row had a non-finite loss"):
        trainer.rl_step(1)
    assert learner.skipped_updates == 3


def test_groups_with_equal_rewards_get_zero_advantages():
    scores = torch.ones(4, 3, 2)
    scores[2:] = 0.0  # two groups of two traces, each group all-equal
    cuts = torch.tensor([[2, 4, 6]] * 4)
    # By hand, a group scoring c everywhere (p = 1/3 each): R_s = c (3 - s) / 3; V2_s = the group
    # mean of R_s = R_s; V1_s = (discounted mean of rbar = c) * (3 - s) / 3 = R_s. So every
    # baseline equals R and every thinking advantage is 0; each summary minus its slot's mean is 0.
    for reduction in ("brpo", "v2only"):
        thinking, summary = brpo_advantages(scores, cuts, 2, [1.0, 1.0, 1.0], variance_reduction=reduction)
        torch.testing.assert_close(thinking, torch.zeros(4, 3), rtol=0, atol=1e-6, msg=reduction)
        torch.testing.assert_close(summary, torch.zeros(4, 3, 2), rtol=0, atol=0, msg=reduction)


def test_an_engine_that_fails_mid_step_stops_the_run_without_a_partial_update(tmp_path):
    config = load_config(None, [*TINY, "rollout.engine=sglang", "rollout.urls=[http://placeholder:1]"])
    from trainer.models import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    server_model = load_model(config.model, tokenizer, "cpu", seed=config.train.seed)
    with ProtocolServer(EmbeddedEngine(server_model, tokenizer), tokenizer) as server:
        config = load_config(None, [*TINY, "rollout.engine=sglang", f"rollout.urls=[{server.url}]",
                                    "rollout.max_retries=2", "rollout.retry_backoff_s=0.01",
                                    "rollout.request_timeout_s=5"])  # fmt: skip
        trainer = Trainer(config, tmp_path)
        trainer.rl_step(0)  # works, and syncs the weights to the server from disk
        before = {n: p.detach().clone() for n, p in trainer.parts.policy.model.named_parameters()}
        server.inject_faults(["500"] * 20)
        with pytest.raises(SGLangServerError, match=rf"{server.url}/generate failed after 3 attempts.*HTTP 500"):
            trainer.rl_step(1)
        for name, parameter in trainer.parts.policy.model.named_parameters():
            assert torch.equal(parameter, before[name]), name


def test_bad_rows_and_long_prompts_are_skipped_or_rejected_by_config(tmp_path):
    rows = [
        {"problem": "Start at 3. Add 4. What is the result modulo 10?", "answer": "7"},
        {"problem": "Start at 1. " + "Add 1. " * 200 + "What is the result modulo 10?", "answer": "1"},
        {"problem": "no answer here"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = [*TINY, f"data.source={path}", "sft.steps=0", "train.prompts_per_step=1", "train.ppo_mini_batch_prompts=1"]
    trainer = Trainer(load_config(None, [*common, "data.skip_bad_rows=true"]), tmp_path / "skip")
    assert len(trainer.parts.train_prompts) == 1
    counts = trainer.parts.data_counts
    assert counts["data/train_too_long"] == 1.0 and counts["data/train_bad_rows"] == 1.0
    with pytest.raises(DataError, match="row 2"):
        Trainer(load_config(None, common), tmp_path / "bad")
    with pytest.raises(DataError, match=r"row 1 has a prompt longer than \d+ tokens"):
        Trainer(load_config(None, [*common, "data.skip_bad_rows=true", "data.skip_long_prompts=false"]),
                tmp_path / "long")  # fmt: skip


def test_a_resume_after_a_stop_neither_repeats_nor_skips_an_evaluation(tmp_path, monkeypatch):
    """Stopped during the SFT evaluation: the resumed run reuses eval/sft.json (its report keeps
    the "sft" row); stopped after a step whose periodic evaluation was due: the resumed run runs
    that evaluation first."""
    from trainer.stopping import RunStopped

    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config(None, [*RUN, "train.steps=3", "train.save_every=0", "eval.every=1"])
    evaluated = record_evaluations(monkeypatch)
    signal_self_during(monkeypatch, Trainer, "evaluate")  # the first evaluation: the SFT model's
    with pytest.raises(RunStopped, match="after RL step 0"):
        Trainer(config, tmp_path / "run").run()
    assert evaluated == ["sft"] and (tmp_path / "run" / "eval" / "sft.json").is_file()

    resumed = Trainer(config, tmp_path / "run", resume="auto")
    real_step = resumed.rl_step

    def first_step_signalled(step):
        if step == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.2)
        return real_step(step)

    resumed.rl_step = first_step_signalled
    with pytest.raises(RunStopped, match="after RL step 1"):  # before step 1's periodic evaluation
        resumed.run()
    assert evaluated == ["sft"], "the SFT evaluation ran again"
    Trainer(config, tmp_path / "run", resume="auto").run()
    assert evaluated == ["sft", "step1", "step2", "final"]
    assert train_steps(tmp_path / "run") == [1, 2, 3]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| sft |" in report and "Anytime score sft -> final" in report


def test_a_crash_in_the_final_evaluation_keeps_the_trained_weights_and_a_resume_runs_only_that_evaluation(
    tmp_path, monkeypatch
):
    """The final checkpoint is written before the final evaluation (the longest one): a run without
    periodic checkpoints that crashes there keeps every RL step. ``--resume auto`` then trains
    nothing and evaluates once, exactly as the uninterrupted run did; resuming the finished run
    reuses its evaluation and logs it once more only in place of the truncated records."""
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config(None, [*RUN, "train.steps=2", "train.save_every=0"])
    Trainer(config, tmp_path / "whole").run()

    run = tmp_path / "run"
    original = Trainer.evaluate
    evaluated, stepped = [], []

    def crash_in_final(self, name, step):
        evaluated.append(name)
        if name == "final":
            raise RuntimeError("out of memory at the longest budget")
        return original(self, name, step)

    monkeypatch.setattr(Trainer, "evaluate", crash_in_final)
    with pytest.raises(RuntimeError, match="out of memory"):
        Trainer(config, run).run()
    assert evaluated == ["sft", "final"] and not (run / "eval" / "final.json").exists()
    final = run / "checkpoints" / "final"
    assert json.loads((final / "trainer_state.json").read_text())["step"] == 2
    whole = load_file(tmp_path / "whole" / "checkpoints" / "final" / "model.safetensors")
    kept = load_file(final / "model.safetensors")
    assert all(torch.equal(kept[name], tensor) for name, tensor in whole.items())

    def recording(self, name, step):
        evaluated.append(name)
        return original(self, name, step)

    real_step = Trainer.rl_step
    monkeypatch.setattr(Trainer, "evaluate", recording)
    monkeypatch.setattr(Trainer, "rl_step", lambda self, step: stepped.append(step) or real_step(self, step))
    resumed = Trainer(config, run, resume="auto")
    assert resumed.resumed_from == final and resumed.start_step == 2
    resumed.run()
    assert stepped == [] and evaluated == ["sft", "final", "final"]
    assert json.loads((run / "eval" / "final.json").read_text()) == json.loads(
        (tmp_path / "whole" / "eval" / "final.json").read_text()
    )
    assert train_steps(run) == [1, 2]

    def final_records():
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if json.loads(line)["step"] == 2 and "eval/anytime_score" in line]

    records = final_records()
    assert len(records) == 1
    (run / "report.md").unlink()
    Trainer(config, run, resume="auto").run()  # the finished run again: its evaluation is reused
    assert stepped == [] and evaluated == ["sft", "final", "final"]
    assert final_records() == records and "| final |" in (run / "report.md").read_text()
    monkeypatch.chdir(tmp_path)  # the same, with the folder and the checkpoint spelled differently
    Trainer(config, Path("run"), resume=str(final.resolve())).run()
    assert evaluated == ["sft", "final", "final"] and final_records() == records
    with pytest.raises(ValueError, match="resumed at RL step 2, past its last step 1"):
        Trainer(config, run, resume="auto").run(max_steps=1)

    longer = load_config(None, [*RUN, "train.steps=3", "train.save_every=0"])
    monkeypatch.setattr(Trainer, "evaluate", crash_in_final)  # a longer run that crashes in its final evaluation
    with pytest.raises(RuntimeError, match="out of memory"):
        Trainer(longer, run, resume="auto").run()
    assert stepped == [2] and json.loads((final / "trainer_state.json").read_text())["step"] == 3
    monkeypatch.setattr(Trainer, "evaluate", recording)
    before = len(evaluated)
    Trainer(longer, run, resume="auto").run()  # evaluates step 3's weights: eval/final.json scored step 2's
    assert stepped == [2] and evaluated[before:] == ["final"] and train_steps(run) == [1, 2, 3]
    assert len([r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["step"] == 3 and "eval/anytime_score" in r]) == 1  # fmt: skip


def test_a_finished_run_resumed_for_more_steps_reuses_its_final_evaluation_as_that_steps(tmp_path, monkeypatch):
    """Resumed from ``final`` with more ``train.steps``, where ``eval.every`` divides the finished
    run's last step: that step's periodic evaluation would score the weights ``eval/final.json``
    already scored, so it is that file (and its named sets'), written as ``eval/step2.json`` and
    logged at step 2 as a fresh evaluation would be (seeded: a re-evaluation gives the same numbers)."""
    from trainer.synthetic import generate_rows, save_rows

    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    files = {name: save_rows(generate_rows(3, seed=seed, min_steps=1, max_steps=2, max_operand=9), tmp_path / f"{name}.jsonl")
             for name, seed in (("a", 11), ("b", 12))}  # fmt: skip
    base = [*RUN, "train.save_every=0", "eval.every=2", f"data.eval_source={{a: {files['a']}, b: {files['b']}}}"]
    run = tmp_path / "run"
    Trainer(load_config(None, [*base, "train.steps=2"]), run).run()
    final = {name: json.loads((run / "eval" / f"{name}.json").read_text()) for name in ("final", "final/a", "final/b")}

    def step2_records(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["step"] == 2 and any(k.startswith("eval/") for k in r)]

    records = step2_records(run)
    assert len(records) == 3  # sets a and b, then their mean
    again = tmp_path / "again"  # the reference: the same resume evaluating step 2 anew
    shutil.copytree(run, again)
    longer = load_config(None, [*base, "train.steps=3"])
    evaluated = record_evaluations(monkeypatch)
    Trainer(longer, run, resume="auto").run()
    assert evaluated == ["final"]  # step 3's; step 2's is the earlier final evaluation
    monkeypatch.setattr(Trainer, "_resumed_from_own", lambda self, name: False)  # as before: no reuse
    Trainer(longer, again, resume=str(again / "checkpoints" / "final")).run()
    assert evaluated == ["final", "step2", "final"]
    for folder in (run, again):
        for name in ("", "/a", "/b"):
            assert json.loads((folder / "eval" / f"step2{name}.json").read_text()) == final[f"final{name}"], name
        assert step2_records(folder) == records
    for name in ("final", "final/a", "final/b"):  # step 3's, the same in both
        assert json.loads((again / "eval" / f"{name}.json").read_text()) == json.loads(
            (run / "eval" / f"{name}.json").read_text()
        )


def test_a_crash_in_a_periodic_evaluation_loses_only_that_evaluation(tmp_path, monkeypatch):
    """A step's periodic evaluation follows its checkpoint: a crash there resumes from that step
    (nothing trained twice) and runs the evaluation again; a crash in the next step resumes from the
    same checkpoint, keeps the finished evaluation and logs its records once. Both end with the
    weights and evaluations of an uninterrupted run."""
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config(None, [*RUN, "train.steps=3", "train.save_every=2", "eval.every=2"])
    Trainer(config, tmp_path / "whole").run()
    whole = tmp_path / "whole"
    original_evaluate, original_step = Trainer.evaluate, Trainer.rl_step
    evaluated, stepped = [], []

    def evaluate(self, name, step):
        evaluated.append(name)
        if name == crash_in:
            raise RuntimeError(f"crash in {name}")
        return original_evaluate(self, name, step)

    def rl_step(self, step):
        stepped.append(step)
        if f"rl_step{step}" == crash_in:
            raise RuntimeError(f"crash in step {step}")
        return original_step(self, step)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    monkeypatch.setattr(Trainer, "rl_step", rl_step)

    def eval_records(run: Path, step: int) -> list[dict]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if r["step"] == step and "eval/anytime_score" in r and "train/loss" not in r]

    for crash_in, resumed_evaluations in (("step2", ["step2", "final"]), ("rl_step2", ["final"])):
        run = tmp_path / crash_in
        evaluated.clear(), stepped.clear()
        with pytest.raises(RuntimeError, match="crash in"):
            Trainer(config, run).run()
        assert latest_checkpoint(run / "checkpoints").name == "step2"
        crash_in = None
        evaluated.clear(), stepped.clear()
        Trainer(config, run, resume="auto").run()
        assert stepped == [2] and evaluated == resumed_evaluations, crash_in
        assert train_steps(run) == [1, 2, 3]
        assert len(eval_records(run, 2)) == 1 and eval_records(run, 2) == eval_records(whole, 2)
        for name in ("step2", "final"):
            assert (run / "eval" / f"{name}.json").read_text() == (whole / "eval" / f"{name}.json").read_text()
        expected = load_file(whole / "checkpoints" / "final" / "model.safetensors")
        resumed = load_file(run / "checkpoints" / "final" / "model.safetensors")
        assert all(torch.equal(resumed[name], tensor) for name, tensor in expected.items())


def test_evaluating_does_not_change_the_training_run(tmp_path, monkeypatch):
    """A seeded evaluation reseeds the engine's sampling generator; training continues from the
    streams as the evaluation found them, so a run evaluated after every step trains exactly like
    one never evaluated between steps (the same losses and final weights)."""
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    runs = {}
    for every in (0, 1):
        run = tmp_path / f"every{every}"
        Trainer(load_config(None, [*RUN, "train.steps=3", "train.save_every=0", f"eval.every={every}"]), run).run()
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [r["train/loss"] for r in records if "train/loss" in r]
        runs[every] = losses, load_file(run / "checkpoints" / "final" / "model.safetensors")
    assert sorted(p.name for p in (tmp_path / "every1" / "eval").glob("step*.json")) == ["step1.json", "step2.json"]
    assert runs[1][0] == runs[0][0] and len(runs[0][0]) == 3
    assert all(torch.equal(runs[1][1][name], tensor) for name, tensor in runs[0][1].items())


def test_a_signal_during_a_periodic_evaluation_stops_after_it_and_a_finished_run_evaluates_nothing_again(
    tmp_path, monkeypatch
):
    """A signal during a periodic evaluation that follows its step's checkpoint stops the run once
    the evaluation is done; the resume reuses it (records once) and goes on. An SFT-only run
    (train.steps=0) resumed when finished evaluates nothing again and reports sft -> final."""
    from trainer.stopping import RunStopped

    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    evaluated = record_evaluations(monkeypatch)
    recording = Trainer.evaluate
    signal_self_during(monkeypatch, Trainer, "evaluate")
    evaluated_signalled = Trainer.evaluate

    def signal_in_step1(self, name, step):  # the SFT evaluation runs unsignalled
        return (evaluated_signalled if name == "step1" else recording)(self, name, step)

    monkeypatch.setattr(Trainer, "evaluate", signal_in_step1)
    run = tmp_path / "run"
    config = load_config(None, [*RUN, "train.steps=3", "train.save_every=1", "eval.every=1"])
    with pytest.raises(RunStopped, match="after RL step 1") as stopped:
        Trainer(config, run).run()
    assert stopped.value.checkpoint == run / "checkpoints" / "step1" and evaluated == ["sft", "step1"]
    Trainer(config, run, resume="auto").run()
    assert evaluated == ["sft", "step1", "step2", "final"] and train_steps(run) == [1, 2, 3]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/anytime_score" in r and "train/loss" not in r] == [0, 1, 2, 3]

    monkeypatch.setattr(Trainer, "evaluate", recording)
    sft_only = load_config(None, [*RUN, "train.steps=0"])
    Trainer(sft_only, tmp_path / "sft_only").run()
    assert evaluated[-2:] == ["sft", "final"]
    Trainer(sft_only, tmp_path / "sft_only", resume="auto").run()
    assert evaluated[-2:] == ["sft", "final"] and len(evaluated) == 6
    assert "Anytime score sft -> final" in (tmp_path / "sft_only" / "report.md").read_text()


def test_stop_signals_pass_other_watchers_their_signals_and_undo_a_failed_start(monkeypatch):
    """A wakeup fd set before (asyncio's) still receives the signals that arrive while the run
    watches its own; a start that fails half-way leaves the handlers and the wakeup fd as they were;
    by default (train.stop_signals) SIGTERM keeps its handler, so torchrun can end ranks at once."""
    import threading

    from trainer.stopping import StopSignals

    handler_before = signal.getsignal(signal.SIGTERM)
    with StopSignals(load_config(None, RUN).train.stop_signals):
        assert signal.getsignal(signal.SIGTERM) == handler_before
        assert signal.getsignal(signal.SIGUSR1) != signal.SIG_DFL
    with pytest.raises(ConfigError, match=r"train\.stop_signals: \['SIGKILL'\]"):
        load_config(None, [*RUN, "train.stop_signals=[SIGKILL]"])
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    outer = signal.set_wakeup_fd(write_end)
    try:
        with StopSignals(["SIGTERM", "SIGUSR1"]) as stop:
            other = signal.signal(signal.SIGUSR2, lambda *args: None)
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.2)
            signal.signal(signal.SIGUSR2, other)
        assert stop.received is None and os.read(read_end, 16) == bytes([signal.SIGUSR2])
        assert signal.set_wakeup_fd(write_end) == write_end  # restored on exit

        def no_thread(self):
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(threading.Thread, "start", no_thread)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            StopSignals(["SIGTERM", "SIGUSR1"]).__enter__()
        assert signal.getsignal(signal.SIGTERM) == handler_before
        assert signal.set_wakeup_fd(write_end) == write_end
    finally:
        signal.set_wakeup_fd(outer)
        os.close(read_end)
        os.close(write_end)
