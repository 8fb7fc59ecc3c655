"""Many processes, one adapter format: 2-process CPU runs under torchrun (gloo) with DDP and FSDP.

`accelerate launch --cpu --num_processes 2` starts a single process on CPU, so these use
`torchrun --nproc_per_node=2`, which is what `accelerate launch` runs on GPUs too. The trainer is unchanged: the
same script runs in-process (one process) and under torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from prefixvqa.config import ConfigError  # noqa: E402
from helpers import adapter_tensors, subprocess_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_gloo_available(),
                                reason="torchrun with the gloo backend is not available")

# 12 records in batches of 3: 4 batches per epoch. Two ranks with one batch each per step see exactly the batches one
# process sees with grad_accum=2, so the weights must match. No dropout anywhere (tiny Llama, LoRA and mapper dropout
# 0): ranks would draw different random masks than one process.
SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from pathlib import Path
    from safetensors.torch import save_file
    from prefixvqa.train import TrainConfig, train
    from helpers import kill_after_save  # tests/ (on PYTHONPATH in subprocesses)
    from prefixvqa.data.synthetic import colour_records
    from prefixvqa.train.recipe import build_model

    MODEL = {"tiny": "llama", "config": {"mapper": {"prefix_length": 2}, "tuning": {"dropout": 0.0}}}

    def run(work, out, kill_at, extra):
        if kill_at:
            kill_after_save(kill_at)
        torch.manual_seed(0)
        model = build_model(MODEL, work)
        cfg = TrainConfig(output_dir=str(out), epochs=2, batch_size=3, seed=3, warmup=0.2, schedule="cosine",
                          save_every_steps=1, lr={"mapper": 1e-2, "lora": 1e-2}, progress=False, tensorboard=False,
                          plot=False, **extra)
        result = train(model, colour_records(12), colour_records(4, seed=1), cfg)
        held = {}
        for name, p in model.named_parameters():  # what this rank holds (sharded tensors gathered: all ranks)
            if p.requires_grad:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                held[name] = full.detach().clone().contiguous()
        save_file(held, str(Path(out) / f"rank{os.environ.get('RANK', '0')}.safetensors"))
        print("SHARDED", sum(hasattr(p, "full_tensor") for p in model.parameters()), "of",
              len(list(model.parameters())))
        print(f"RESULT {result.stopped_reason} {result.global_step}", flush=True)  # one write: ranks interleave
        return result

    if __name__ == "__main__":
        run(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))
""")


def launch(work: Path, out: Path, kill_at: int = 0, extra: dict | None = None, procs: int = 2,
           port: int = 29541) -> subprocess.CompletedProcess:
    """The script under torchrun with `procs` ranks; one rank is the one-process reference, run the same way (a
    torchrun child with the ranks' environment and one thread), so reference and ranks differ only in world size."""
    script = work / "dist_script.py"
    script.write_text(SCRIPT)
    launcher = [str(TORCHRUN), f"--nproc_per_node={procs}", f"--master_port={port}"]
    cmd = [*launcher, str(script), str(work), str(out), str(kill_at), json.dumps(extra or {})]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)


def in_process(work: Path, out: Path, extra: dict | None = None, kill_at: int = 0):
    namespace: dict = {"__name__": "dist_script"}
    exec(SCRIPT, namespace)
    return namespace["run"](work, out, kill_at, extra or {})


def tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(file))


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The tiny decoder folder is built here once, so two ranks never build it at the same time."""
    work = tmp_path_factory.mktemp("dist")
    from prefixvqa.train.recipe import build_model

    build_model({"tiny": "llama"}, work)
    return work


@pytest.fixture(scope="module")
def single(work) -> Path:
    """One process, two micro-batches accumulated per step: the same global batches as two ranks. Launched like the
    ranks (torchrun, one thread): run inside pytest it would use this process's thread count, and a different
    reduction order in the matrix products moves the weights by more than the tolerance on some machines."""
    out = work / "single"
    run = launch(work, out, extra={"grad_accum": 2}, procs=1, port=29539)
    assert run.returncode == 0 and "RESULT completed 4" in run.stdout, (run.stdout + run.stderr)[-3000:]
    return out


@pytest.fixture(scope="module")
def ddp(work) -> Path:
    out = work / "ddp"
    run = launch(work, out)
    assert run.returncode == 0 and "RESULT completed 4" in run.stdout, (run.stdout + run.stderr)[-3000:]
    assert "SHARDED 0 of" in run.stdout  # DDP: whole replicas
    return out


@pytest.mark.slow
def test_ddp_ranks_hold_identical_weights_equal_to_one_process(ddp, single):
    rank0, rank1 = tensors(ddp / "rank0.safetensors"), tensors(ddp / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and rank0
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k  # DDP replicas stay bit-identical
    assert_close(rank0, tensors(single / "rank0.safetensors"), atol=1e-6)
    # only rank 0 wrote, and what it wrote is the ordinary adapter folder, equal to a one-process run's
    assert_close(adapter_tensors(ddp / "last"), adapter_tensors(single / "last"), atol=1e-6)
    state = json.loads((ddp / "last" / "trainer_state" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["strategy"] == "ddp"
    from prefixvqa.model import MedVQAAdapter

    MedVQAAdapter.from_pretrained(ddp / "last")
    leftovers = [p.name for p in ddp.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers


@pytest.mark.slow
def test_kill_and_resume_under_two_processes_is_exact(work, ddp):
    cut = work / "ddp-cut"
    killed = launch(work, cut, kill_at=2, port=29543)
    assert killed.returncode != 0, killed.stdout[-2000:]
    state = json.loads((cut / "last" / "trainer_state" / "state.json").read_text())
    assert state["step"] == 2 and state["position"] == 2 and state["world_size"] == 2

    # resuming with another number of processes: tests/test_reshard.py
    resumed = launch(work, cut, extra={"resume": True}, port=29545)
    assert resumed.returncode == 0 and "RESULT completed 4" in resumed.stdout, (resumed.stdout + resumed.stderr)[-3000:]
    assert_close(adapter_tensors(cut / "last"), adapter_tensors(ddp / "last"), atol=1e-7)
    a = json.loads((ddp / "last" / "trainer_state" / "state.json").read_text())
    b = json.loads((cut / "last" / "trainer_state" / "state.json").read_text())
    assert a["step"] == b["step"] and a["scheduler"] == b["scheduler"] and a["rng"] == b["rng"]


@pytest.mark.slow
def test_fsdp_full_shard_on_cpu_matches_one_process_and_resumes(work, single):
    """torch 2.14's FSDP2 (`fully_shard`) runs on CPU with gloo; accelerate's FSDP path needs GPUs, so the trainer
    shards with torch directly. Killed after step 2 and resumed (full optimizer state gathered and re-sharded)."""
    out = work / "fsdp"
    killed = launch(work, out, kill_at=2, extra={"distributed": "fsdp"}, port=29547)
    assert killed.returncode != 0, (killed.stdout + killed.stderr)[-3000:]
    assert json.loads((out / "last" / "trainer_state" / "state.json").read_text())["strategy"] == "fsdp"
    run = launch(work, out, extra={"distributed": "fsdp", "resume": True}, port=29549)
    assert run.returncode == 0 and "RESULT completed 4" in run.stdout, (run.stdout + run.stderr)[-3000:]
    sharded = run.stdout.split("SHARDED ")[1].split()
    assert sharded[0] == sharded[2] != "0"  # every parameter became a DTensor shard
    rank0, rank1 = tensors(out / "rank0.safetensors"), tensors(out / "rank1.safetensors")
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
    assert_close(rank0, tensors(single / "rank0.safetensors"), atol=1e-5)
    assert_close(adapter_tensors(out / "last"), adapter_tensors(single / "last"), atol=1e-5)
    from prefixvqa.model import MedVQAAdapter

    MedVQAAdapter.from_pretrained(out / "best")  # gathered to rank 0: an ordinary one-process adapter


SLOW_CLI = textwrap.dedent("""
    import sys, time
    from prefixvqa.train import trainer as T
    step = T.Trainer._optimizer_step
    def slow(self, *args):  # leave time to deliver the signal mid-run
        time.sleep(0.25)
        return step(self, *args)
    T.Trainer._optimizer_step = slow
    from prefixvqa.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "rank 0 only"])
def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step(work, target):
    """SIGTERM to torchrun (which passes it to every rank) or to one rank only: the ranks agree on the step, save it
    (train.save_on_signal), each says so in one line, and the lock is released; no rank is left hanging."""
    import signal
    import time

    import yaml

    out = work / f"signal-{target.split()[0]}"
    recipe = work / f"{out.name}.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"tiny": "llama", "config": {"mapper": {"prefix_length": 2}}},
        "data": {"train": {"format": "synthetic", "n": 12}},
        "train": {"output_dir": str(out), "epochs": 20, "batch_size": 3, "seed": 3, "log_every": 1,
                  "save_on_signal": True, "eval_every_epoch": False, "progress": False, "tensorboard": False,
                  "plot": False}}))
    script = work / "slow_cli.py"
    script.write_text(SLOW_CLI)
    cmd = [str(TORCHRUN), "--nproc_per_node=2", "--master_port=29551", str(script), "train", str(recipe)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    log, deadline = out / "log.jsonl", time.time() + 240
    while not (log.is_file() and '"train"' in log.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    if target == "launcher":
        proc.send_signal(signal.SIGTERM)
    else:
        os.kill(json.loads((out / "prefixvqa.lock").read_text())["pid"], signal.SIGTERM)  # rank 0 holds the lock
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("prefixvqa train:")]
    step = json.loads((out / "last" / "trainer_state" / "state.json").read_text())["step"]
    assert len(lines) == 2 and len(set(lines)) == 1, err[-3000:]  # both ranks, the same step
    assert f"stopped by SIGTERM after optimizer step {step} of 40" in lines[0], lines
    assert f'File "{ROOT / "prefixvqa"}' not in err, err[-3000:]  # no rank died with a traceback
    assert not (out / "prefixvqa.lock").exists()
    if target != "launcher":
        assert proc.returncode != 0  # torchrun reports the ranks' exit status 143


def test_strategy_choice_and_refusals(monkeypatch, tmp_path):
    from prefixvqa.train import TrainConfig
    from prefixvqa.train.distributed import Distributed, strategy_of

    assert strategy_of(TrainConfig()) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --config_file recipes/launch/fsdp...
    assert strategy_of(TrainConfig()) == "fsdp"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert strategy_of(TrainConfig(distributed="deepspeed", deepspeed_config=str(ds))) == "zero3"
    with pytest.raises(ConfigError, match="distributed"):
        TrainConfig(distributed="horovod")
    dist = Distributed(TrainConfig(distributed="deepspeed", deepspeed_config=str(ds)))
    with pytest.raises(ConfigError, match="DeepSpeed is not supported"):
        dist.check_resume({"world_size": 8}, 8, tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs CUDA"):
            dist.accelerator_kwargs()


def test_sharding_refuses_quantised_decoders_and_one_process(work):
    from prefixvqa.train import TrainConfig
    from prefixvqa.train.distributed import Distributed
    from prefixvqa.train.recipe import build_model

    model = build_model({"tiny": "llama"}, work)
    with pytest.raises(ConfigError, match="several processes"):
        Distributed(TrainConfig(distributed="fsdp")).check(model, 1)
    model.config = model.config.replace(decoder={"quantization": "4bit", "model_config": None})
    with pytest.raises(ConfigError, match="cannot shard a bitsandbytes 4bit decoder"):
        Distributed(TrainConfig(distributed="fsdp")).check(model, 2)


@pytest.mark.parametrize("kind, strategy", [("ddp", "ddp"), ("fsdp", "fsdp"), ("zero2", "zero2"), ("zero3", "zero3")])
def test_launch_configs_for_8_gpus(monkeypatch, kind, strategy):
    """recipes/launch/: accelerate reads each config; the environment `accelerate launch` derives from it selects the
    trainer's strategy; the DeepSpeed JSONs take the run's accumulation and clipping through accelerate's plugin."""
    from accelerate.commands.config.config_args import ClusterConfig

    from prefixvqa.train import TrainConfig
    from prefixvqa.train.distributed import strategy_of

    config = ClusterConfig.from_yaml_file(str(ROOT / "recipes" / "launch" / f"accelerate_{kind}_8gpu.yaml"))
    assert config.num_processes == 8 and config.mixed_precision == "bf16"
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    if config.distributed_type == "FSDP":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    if config.distributed_type == "DEEPSPEED":
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        file = ROOT / config.deepspeed_config["deepspeed_config_file"]
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(file))
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(hf_ds_config=str(file), gradient_accumulation_steps=4, gradient_clipping=1.0)
        assert plugin.deepspeed_config["gradient_accumulation_steps"] == 4
        assert plugin.deepspeed_config["gradient_clipping"] == 1.0 and plugin.zero_stage == int(kind[-1])
    assert strategy_of(TrainConfig()) == strategy
