"""SIGTERM and Ctrl-C during training (issue 18): what a cluster scheduler or `docker stop` sends must not kill a run
silently and leave its lock. The run stops at the end of the current optimizer step, keeps (or, with
`train.save_on_signal`, writes) its last checkpoint, releases the lock, restores the caller's signal handlers and
says so in one line; resuming gives the uninterrupted result. Real signals throughout (os.kill); the torchrun case is
in test_distributed.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from helpers import adapter_tensors, subprocess_env  # noqa: E402
from prefixvqa.data.synthetic import colour_records  # noqa: E402
from prefixvqa.train import TrainConfig, train  # noqa: E402
from prefixvqa.train import trainer as trainer_mod  # noqa: E402
from prefixvqa.train.checkpoint import LOCK_NAME  # noqa: E402
from prefixvqa.train.recipe import build_model  # noqa: E402
from prefixvqa.train.stopping import SignalInterrupt, TrainingInterrupted  # noqa: E402

FAST = {"progress": False, "tensorboard": False, "plot": False}
MODEL = {"tiny": "gpt2", "config": {"mapper": {"prefix_length": 2}}}


def state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state" / "state.json").read_text())


def signal_at_step(monkeypatch, step: int, *signums: int) -> None:
    """Send this process `signums` (real signals) during optimizer step `step` (1-based), before it finishes."""
    original = trainer_mod.Trainer._optimizer_step

    def step_and_signal(self, *args):
        if self.step + 1 == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return original(self, *args)

    monkeypatch.setattr(trainer_mod.Trainer, "_optimizer_step", step_and_signal)


def run(tmp_path: Path, name: str, **kw):
    torch.manual_seed(0)
    model = build_model(MODEL, tmp_path)
    cfg = TrainConfig(**{"output_dir": str(tmp_path / name), "epochs": 2, "batch_size": 3, "seed": 3, **FAST, **kw})
    return train(model, colour_records(10), colour_records(4, seed=1), cfg)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_the_end_of_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, signum):
    out = tmp_path / "stopped"
    before = signal.getsignal(signum)
    signal_at_step(monkeypatch, 3, signum)
    with pytest.raises(TrainingInterrupted) as caught:
        run(tmp_path, "stopped", save_every_steps=2)
    exc = caught.value
    name = signal.Signals(signum).name
    assert exc.signum == signum and str(exc) == (
        f"stopped by {name} after optimizer step 3 of 8 (epoch 0); last checkpoint: {out / 'last'} (step 2); resume "
        f"with train.resume=true")
    assert exc.result.stopped_reason == f"stopped by {name}" and exc.result.global_step == 3
    assert state(out / "last")["step"] == 2  # the step-3 weights were not saved: save_on_signal is off
    assert not (out / LOCK_NAME).exists() and signal.getsignal(signum) is before
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1] == {"kind": "stop", "step": 3, "epoch": 0, "reason": f"stopped by {name}"}


def test_save_on_signal_writes_the_stopped_step_and_resume_is_exact(tmp_path, monkeypatch):
    reference = run(tmp_path, "reference")
    signal_at_step(monkeypatch, 3, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match=r"step 3 of 8 .*last checkpoint: .*last \(step 3\)"):
        run(tmp_path, "cut", save_on_signal=True)  # no save_every_steps: the only checkpoint is the signal's
    monkeypatch.undo()
    assert state(tmp_path / "cut" / "last")["step"] == 3 and state(tmp_path / "cut" / "last")["position"] == 3
    resumed = run(tmp_path, "cut", resume=True)
    assert resumed.stopped_reason == reference.stopped_reason == "completed" and resumed.global_step == 8
    for name in ("last", "best"):
        a, b = adapter_tensors(tmp_path / "reference" / name), adapter_tensors(tmp_path / "cut" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_signal_delivered_twice_at_once_is_one_request(tmp_path, monkeypatch):
    """Ctrl-C reaches torchrun's ranks from the terminal and again from torchrun: still a stop at the step's end."""
    signal_at_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT after optimizer step 2 of 8"):
        run(tmp_path, "repeated", save_every_steps=1)
    assert state(tmp_path / "repeated" / "last")["step"] == 2


def test_a_second_signal_stops_at_once(tmp_path, monkeypatch):
    from prefixvqa.train import stopping

    monkeypatch.setattr(stopping, "SAME_REQUEST_S", 0.0)  # a second request, not the first one delivered twice
    signal_at_step(monkeypatch, 2, signal.SIGTERM, signal.SIGTERM)
    with pytest.raises(SignalInterrupt, match="stopped by SIGTERM .a second time") as caught:
        run(tmp_path, "twice", save_every_steps=1)
    assert isinstance(caught.value, KeyboardInterrupt) and caught.value.signum == signal.SIGTERM
    assert not (tmp_path / "twice" / LOCK_NAME).exists() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert state(tmp_path / "twice" / "last")["step"] == 1


def test_a_signal_before_the_loop_stops_at_once_and_releases_the_lock(tmp_path, monkeypatch):
    original = trainer_mod.recover_output

    def recover_then_signal(*args):  # while the Trainer is being built, the lock held
        original(*args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer_mod, "recover_output", recover_then_signal)
    with pytest.raises(SignalInterrupt, match="stopped by SIGTERM .outside a training step"):
        run(tmp_path, "early")
    assert not (tmp_path / "early" / LOCK_NAME).exists() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_callers_own_handler_is_left_alone(tmp_path, monkeypatch):
    seen = []
    own = lambda signum, frame: seen.append(signum)  # noqa: E731
    previous = signal.signal(signal.SIGTERM, own)
    try:
        signal_at_step(monkeypatch, 2, signal.SIGTERM)
        assert run(tmp_path, "own", epochs=1).stopped_reason == "completed"
        assert seen == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------ a real `prefixvqa train`
SLOW_CLI = textwrap.dedent("""
    import sys, time
    from prefixvqa.train import trainer as T
    step = T.Trainer._optimizer_step
    def slow(self, *args):  # a step of a real model takes a while: leave time to deliver the signal mid-run
        time.sleep(0.25)
        return step(self, *args)
    T.Trainer._optimizer_step = slow
    from prefixvqa.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _recipe(tmp_path: Path, out: Path) -> Path:
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": MODEL, "data": {"train": {"format": "synthetic", "n": 8}, "eval": {"format": "synthetic", "n": 4}},
        "train": {"output_dir": str(out), "epochs": 3, "batch_size": 2, "seed": 5, "log_every": 1,
                  "save_on_signal": True, **FAST}}))
    return path


def _cli(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, "train", str(recipe), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(TOKENIZERS_PARALLELISM="false"))


def _logged_step(out: Path) -> int:
    try:
        rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines() if r.strip()]
    except (OSError, ValueError):
        return 0
    return max((r.get("step", 0) for r in rows if r.get("kind") == "train"), default=0)


def test_sigterm_to_prefixvqa_train_exits_with_one_line_and_resumes_to_the_same_adapter(tmp_path):
    build_model(MODEL, tmp_path)  # the tiny decoder folder exists before the runs
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    reference = _cli(_recipe(tmp_path, ref))
    proc = _cli(_recipe(tmp_path, cut))
    deadline = time.time() + 240
    while _logged_step(cut) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("prefixvqa train:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    stopped = state(cut / "last")["step"]
    assert re.fullmatch(rf"prefixvqa train: error: stopped by SIGTERM after optimizer step {stopped} of 12 \(epoch "
                        rf"\d\); last checkpoint: {re.escape(str(cut / 'last'))} \(step {stopped}\); resume with "
                        rf"train.resume=true", lines[0]), lines[0]
    assert 2 <= stopped < 12 and not (cut / LOCK_NAME).exists() and "final adapter" not in out
    resumed = _cli(_recipe(tmp_path, cut), "--set", "train.resume=true")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-3000:]
    assert reference.wait(timeout=300) == 0, reference.communicate()[1][-3000:]
    for name in ("last", "best"):
        a, b = adapter_tensors(ref / name), adapter_tensors(cut / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bit-identical
    assert state(ref / "last")["rng"] == state(cut / "last")["rng"] and not (cut / LOCK_NAME).exists()


def test_sigterm_during_a_sweeps_training_exits_143_with_one_line(tmp_path, monkeypatch, capsys):
    """Every command that trains (train, sweep, demo) exits as a process killed by the signal would, with one line."""
    from prefixvqa.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": MODEL, "data": {"train": {"format": "synthetic", "n": 8, "seed": 0, "kind": "vqa"},
                                 "eval": {"format": "synthetic", "n": 4, "seed": 1, "kind": "vqa"}},
        "train": {"epochs": 2, "batch_size": 4, **FAST, "eval_every_epoch": False}}))
    signal_at_step(monkeypatch, 2, signal.SIGTERM)
    capsys.readouterr()
    status = main(["sweep", str(recipe), "--train-sizes", "8", "--seeds", "1", "--out", str(tmp_path / "sweep")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prefixvqa ")]
    assert status == 128 + signal.SIGTERM and len(lines) == 1 and "SIGTERM" in lines[0], lines
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
