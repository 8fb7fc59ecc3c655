"""Trainer: exact resume after SIGKILL, early stopping, NaN guard, learning, checkpoint completeness, torchrun."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from prefixvqa.config import ConfigError  # noqa: E402
from prefixvqa.train import TrainConfig, epoch_batches, train  # noqa: E402
from prefixvqa.train import trainer as trainer_mod  # noqa: E402
from prefixvqa.data.synthetic import colour_records  # noqa: E402
from prefixvqa.train.recipe import build_model  # noqa: E402
from helpers import adapter_tensors, subprocess_env  # noqa: E402

FAST = {"progress": False, "tensorboard": False, "plot": False}
MODEL = {"tiny": "gpt2", "config": {"mapper": {"prefix_length": 2}}}

# One training run, used in-process and in subprocesses (resume, torchrun): same seed -> same initial weights.
SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from pathlib import Path
    from prefixvqa.train import TrainConfig, train
    from helpers import kill_after_save  # tests/ (on PYTHONPATH in subprocesses)
    from prefixvqa.data.synthetic import colour_records
    from prefixvqa.train.recipe import build_model

    def run(work, out, kill_at, extra):
        if kill_at:
            kill_after_save(kill_at)
        torch.manual_seed(0)
        model = build_model({"tiny": "gpt2", "config": {"mapper": {"prefix_length": 2, "dropout": 0.1}}}, work)
        cfg = TrainConfig(output_dir=str(out), epochs=2, batch_size=3, grad_accum=2, save_every_steps=1, seed=3,
                          warmup=0.2, schedule="cosine", progress=False, tensorboard=False, plot=False, **extra)
        result = train(model, colour_records(14), colour_records(4, seed=1), cfg)
        print(f"RESULT {result.stopped_reason} {result.global_step}", flush=True)  # one write: ranks interleave
        return result

    if __name__ == "__main__":
        run(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))
""")


def run_script(work: Path, out: Path, kill_at: int = 0, extra: dict | None = None,
               launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    script = work / "train_script.py"
    script.write_text(SCRIPT)
    cmd = [*(launcher or [sys.executable]), str(script), str(work), str(out), str(kill_at), json.dumps(extra or {})]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)


def run_in_process(work: Path, out: Path, extra: dict | None = None):
    namespace: dict = {"__name__": "train_script"}
    exec(SCRIPT, namespace)
    return namespace["run"](work, out, 0, extra or {})


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trainer")


def fresh_model(work: Path):
    torch.manual_seed(0)
    return build_model(MODEL, work)


def no_tmp_left(folder: Path) -> None:
    leftovers = [p.name for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers


def test_config_validation_and_round_trip():
    cfg = TrainConfig(lr={"mapper": 0.01}, warmup=0.1, patience=2)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.group_lr("mapper") == 0.01 and cfg.group_lr("lora") == 2e-4
    for bad in ({"schedule": "step"}, {"lr": {"head": 1.0}}, {"warmup": 2.5}, {"mixed_precision": "fp8"},
                {"metric": "bleu"}, {"patience": 0}, {"on_bad_image": "ignore"}, {"trainable": ["vision"]}):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="unknown field"):
        TrainConfig.from_dict({"epoch": 3})


def test_length_grouped_batches_are_seeded_permutations():
    records = colour_records(23)
    a = epoch_batches(records, 4, seed=1, epoch=0, group_by_length=True)
    assert a == epoch_batches(records, 4, seed=1, epoch=0, group_by_length=True)
    assert a != epoch_batches(records, 4, seed=1, epoch=1, group_by_length=True)
    assert sorted(i for b in a for i in b) == list(range(23))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_sigkill_matches_uninterrupted_run(work, workers):
    """Killed mid-epoch and resumed (with DataLoader workers or without) = an uninterrupted run without workers."""
    full, cut = work / "full", work / f"cut-{workers}"
    killed = run_script(work, cut, kill_at=2, extra={"num_workers": workers})
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = json.loads((cut / "last" / "trainer_state" / "state.json").read_text())
    assert state["step"] == 2 and state["epoch"] == 0 and state["position"] == 4  # mid-epoch: 5 batches, accum 2
    no_tmp_left(cut)
    assert run_in_process(work, cut, {"resume": True, "num_workers": workers}).stopped_reason == "completed"
    if not (full / "last").is_dir():
        assert run_in_process(work, full).stopped_reason == "completed"
    a, b = adapter_tensors(full / "last"), adapter_tensors(cut / "last")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k  # reference ran in this process: other threads
    sa = json.loads((full / "last" / "trainer_state" / "state.json").read_text())
    sb = json.loads((cut / "last" / "trainer_state" / "state.json").read_text())
    assert sa["step"] == sb["step"] and sa["scheduler"] == sb["scheduler"] and sa["rng"] == sb["rng"]


def test_loss_falls_and_checkpoints_are_complete(work):
    out = work / "learn"
    result = train(fresh_model(work), colour_records(8), colour_records(4, seed=1),
                   TrainConfig(output_dir=str(out), epochs=6, batch_size=4, lr={"mapper": 1e-2, "lora": 1e-2},
                               log_every=1, progress=False, metric="loss"))
    losses = [r["loss"] for r in result.history if r["kind"] == "train"]
    evals = [r["value"] for r in result.history if r["kind"] == "eval"]
    assert losses[-1] < losses[0] - 0.1 and evals[-1] < evals[0]
    assert result.stopped_reason == "completed" and result.global_step == 12
    for folder in (out / "best", out / "last"):
        names = {p.name for p in folder.iterdir()}
        assert {"prefixvqa_config.json", "mapper.safetensors", "adapter_config.json", "adapter_model.safetensors",
                "README.md"} <= names
    assert {p.name for p in (out / "last" / "trainer_state").iterdir()} == {"state.json", "optimizer.safetensors"}
    assert (out / "loss.png").stat().st_size > 0 and any((out / "tb").iterdir())
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"train", "eval"} <= {r["kind"] for r in rows}
    no_tmp_left(out)
    from prefixvqa.model import MedVQAAdapter

    MedVQAAdapter.from_pretrained(out / "best")  # a normal, loadable adapter


def test_early_stopping_patience_resets_on_improvement(work, monkeypatch):
    values = iter([3.0, 2.0, 2.5, 1.5, 2.0, 1.9, 5.0, 0.1])
    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", lambda self: {"loss": next(values), "count": 1})
    result = train(fresh_model(work), colour_records(4), colour_records(2),
                   TrainConfig(output_dir=str(work / "early"), epochs=10, batch_size=4, patience=2, **FAST))
    evals = [r for r in result.history if r["kind"] == "eval"]
    assert [r["bad_epochs"] for r in evals] == [0, 0, 1, 0, 1, 2]
    assert result.stopped_reason == "early stopping" and result.best_metric == 1.5
    metrics = json.loads((work / "early" / "best" / "metrics.json").read_text())
    assert metrics["loss"] == 1.5 and metrics["epoch"] == 4


def test_nan_guard_keeps_last_good_checkpoint(work):
    model = fresh_model(work)
    calls = {"n": 0}
    forward = model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned
    snapshots = {}
    original = trainer_mod.Trainer.save_last

    def save_and_snapshot(self):
        original(self)
        snapshots[self.step] = {k: v.detach().clone() for k, v in self.raw.mapper.state_dict().items()}

    trainer_mod.Trainer.save_last = save_and_snapshot
    try:
        with pytest.raises(trainer_mod.TrainingDiverged) as caught:
            train(model, colour_records(8), None,
                  TrainConfig(output_dir=str(work / "nan"), epochs=3, batch_size=2, save_every_steps=1, **FAST))
    finally:
        trainer_mod.Trainer.save_last = original
    result = caught.value.result
    assert result.stopped_reason == "non-finite loss" and result.global_step == 3
    batch = epoch_batches(colour_records(8), 2, seed=0, epoch=0, group_by_length=False)[3]  # the 4th forward
    message = str(caught.value)
    assert "optimizer step 4" in message and str(work / "nan" / "last") in message and "(step 3)" in message
    assert all(f"synthetic-vqa-0-{i}" in message for i in batch)
    saved = adapter_tensors(work / "nan" / "last")
    for k, v in snapshots[3].items():
        assert torch.equal(saved[f"mapper/mapper.{k}"], v)
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert json.loads((work / "nan" / "last" / "trainer_state" / "state.json").read_text())["step"] == 3
    assert not (work / "nan" / "best").exists()
    no_tmp_left(work / "nan")


def test_bad_image_skip_and_stop(work):
    from prefixvqa.data.images import ImageLoadError

    records = colour_records(4)
    records[1].image = str(work / "missing.png")
    result = train(fresh_model(work), records, None,
                   TrainConfig(output_dir=str(work / "skip"), epochs=1, batch_size=2, **FAST))
    assert result.skipped_images == [str(work / "missing.png")]
    with pytest.raises(ImageLoadError, match="missing.png"):
        train(fresh_model(work), records, None,
              TrainConfig(output_dir=str(work / "stop"), epochs=1, batch_size=2, on_bad_image="stop", **FAST))


@pytest.mark.slow
def test_torchrun_two_processes_gloo(work):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not available")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    out = work / "ddp"
    run = run_script(work, out, extra={"max_steps": 2},
                     launcher=[torchrun, "--nproc_per_node=2", "--master_port=29533"])
    assert run.returncode == 0 and "RESULT max_steps 2" in run.stdout, (run.stdout + run.stderr)[-3000:]
    state = json.loads((out / "last" / "trainer_state" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    tensors = adapter_tensors(out / "last")
    assert {k.split("/")[0] for k in tensors} == {"mapper", "lora"}
    from prefixvqa.model import MedVQAAdapter

    MedVQAAdapter.from_pretrained(out / "last")
    no_tmp_left(out)


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_weights(work, monkeypatch):
    from prefixvqa.model import MedVQAAdapter

    seen: list[torch.dtype] = []
    original = MedVQAAdapter.forward

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append(out.logits.dtype)
        return out

    monkeypatch.setattr(MedVQAAdapter, "forward", spy)
    out = work / "bf16"
    result = train(fresh_model(work), colour_records(8), colour_records(4, seed=1),
                   TrainConfig(output_dir=str(out), epochs=4, batch_size=4, lr={"mapper": 1e-2, "lora": 1e-2},
                               mixed_precision="bf16", log_every=1, **FAST))
    assert seen and set(seen) == {torch.bfloat16}  # the decoder really ran under autocast
    losses = [r["loss"] for r in result.history if r["kind"] == "train"]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert {v.dtype for v in adapter_tensors(out / "last").values()} == {torch.float32}  # master weights stay fp32


def test_gradient_checkpointing_gives_the_same_adapter(work):
    """Recomputing activations in backward must not change the math: same seed, same tensors."""
    runs = {}
    for flag in (False, True):
        model = fresh_model(work)
        out = work / f"ckpt-{flag}"
        train(model, colour_records(8), colour_records(2, seed=1),
              TrainConfig(output_dir=str(out), epochs=2, batch_size=4, lr={"mapper": 1e-2, "lora": 1e-2},
                          gradient_checkpointing=flag, **FAST))
        assert model.decoder.get_base_model().is_gradient_checkpointing == flag
        runs[flag] = adapter_tensors(out / "last")
    assert runs[True].keys() == runs[False].keys()
    for key, value in runs[False].items():
        torch.testing.assert_close(runs[True][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_fp16_without_cuda_is_refused_not_silently_fp32(work):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 with loss scaling is allowed")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train(fresh_model(work), colour_records(4), [],
              TrainConfig(output_dir=str(work / "fp16"), epochs=1, batch_size=4, mixed_precision="fp16", **FAST))


def test_fp16_loss_scaling_skips_overflow_steps_and_round_trips():
    """The run's own loss scaler (accelerate's precision is process-wide): an inf gradient skips the step and lowers
    the scale, a finite one steps; its state goes into the checkpoint and comes back."""
    from prefixvqa.train.precision import Precision

    class Wrapped:  # what accelerate's optimizer wrapper offers the precision
        def __init__(self, optimizer):
            self.optimizer, self.step_was_skipped = optimizer, False

    weight = torch.nn.Parameter(torch.ones(3))
    opt = Wrapped(torch.optim.SGD([weight], lr=0.1))
    precision = Precision("fp16", torch.device("cpu"))
    assert precision.dtype == torch.float16 and precision.scaler is not None
    scale = precision.scaler.get_scale()
    precision.scale(weight.sum() * float("inf")).backward()
    precision.unscale(opt)
    assert precision.step(opt) is False and precision.scaler.get_scale() < scale
    assert torch.equal(weight.detach(), torch.ones(3))  # the overflowing update was not applied
    opt.optimizer.zero_grad()
    precision.scale(weight.sum()).backward()
    assert precision.step(opt) is True and torch.allclose(weight.detach(), torch.full((3,), 0.9))
    again = Precision("fp16", torch.device("cpu"))
    again.load_state_dict(precision.state_dict())
    assert again.scaler.get_scale() == precision.scaler.get_scale()
    none = Precision("bf16", torch.device("cpu"))
    assert none.scaler is None and none.state_dict() is None and none.scale(weight.sum()).dtype == torch.float32
