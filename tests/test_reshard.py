"""Resume at another world size (issue #19): the global batches stay the original run's, accumulation adapts, the
optimizer state re-shards, and the result equals an uninterrupted run; what cannot be honoured is refused.

The torchrun runs reuse tests/test_distributed.py's script and launcher (12 records, micro-batches of 3, global batch
of 2 micro-batches: 2 ranks x 1, or 1 process x grad_accum 2; no dropout, so the reseeded random streams of a
resharded resume draw nothing that matters).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from prefixvqa.config import ConfigError  # noqa: E402
from prefixvqa.train import TrainConfig  # noqa: E402
from prefixvqa.train.sampling import BatchPlan, restore_rank_state  # noqa: E402
from helpers import adapter_tensors  # noqa: E402
from test_distributed import assert_close, ddp, launch, single, tensors, work  # noqa: E402,F401


def old_rank_batches(batches: list, world: int, rank: int, per_rank: int) -> list:
    """The split before plans existed (trainer.py up to issue #19): what same-world runs must keep doing."""
    batches = batches[:max(world, len(batches) // world * world)] if len(batches) >= world else batches * world
    return batches[rank::world][:per_rank]


@pytest.mark.parametrize("n", [1, 2, 5, 8, 12, 13])
@pytest.mark.parametrize("world, accum", [(1, 1), (1, 3), (2, 1), (2, 2), (3, 2), (4, 1)])
def test_plan_at_its_own_world_size_is_the_historical_split(n, world, accum):
    plan = BatchPlan(n * 3, 3, world, accum)
    batches = [[i] for i in range(n)]
    assert plan.per_rank == max(1, n // world)
    for rank in range(world):
        assert plan.rank_batches(batches, world, rank) == old_rank_batches(batches, world, rank, plan.per_rank)


@pytest.mark.parametrize("n, world, accum, new", [(24, 2, 1, 1), (23, 2, 1, 1), (24, 1, 2, 2), (25, 2, 2, 4),
                                                  (24, 4, 2, 2), (24, 2, 3, 3), (24, 4, 1, 2), (22, 1, 4, 2)])
def test_every_step_trains_the_same_micro_batches_at_the_new_world_size(n, world, accum, new):
    """Rank r at world `new` accumulates every `new`-th micro-batch of each global batch: the union over ranks of
    each step is the original step (a partial last step included), and each rank accumulates G/new of them."""
    plan, batches = BatchPlan(n * 3, 3, world, accum), [[i] for i in range(n)]
    assert plan.problem(new) is None
    steps_of = {}
    for w, in ((world,), (new,)):
        per = [plan.rank_batches(batches, w, r) for r in range(w)]
        a = plan.accum_at(w)
        steps = []
        for s in range(plan.steps_per_epoch):
            steps.append(sorted(b[0] for part in per for b in part[s * a:(s + 1) * a]))
        steps_of[w] = steps
        assert sum(map(len, per)) == plan.per_rank * world  # nothing dropped or repeated
    assert steps_of[world] == steps_of[new]


def test_positions_convert_at_step_boundaries_only(tmp_path):
    plan = BatchPlan(30, 3, 2, 2)  # 10 micro-batches, 5 per rank at 2: steps of 4, 4, 2 micro-batches
    assert (plan.steps_per_epoch, plan.global_size, plan.last_size) == (3, 4, 2)
    assert plan.rank_position(2, 2, 1, tmp_path) == 4  # after step 1
    assert plan.rank_position(4, 2, 1, tmp_path) == 8
    assert plan.rank_position(5, 2, 1, tmp_path) == 10  # the end of the epoch (last step partial)
    assert plan.rank_position(10, 1, 2, tmp_path) == 5
    assert plan.rank_position(3, 2, 2, tmp_path) == 3  # same size: as it was
    with pytest.raises(ConfigError, match="not at the end of an optimizer step"):
        plan.rank_position(3, 2, 1, tmp_path)


def test_a_world_size_that_cannot_share_the_global_batch_is_refused_in_one_line(tmp_path):
    state = {"world_size": 1, "rng": [{}], "step": 2, "signature": {"train": {"grad_accum": 1}}}
    with pytest.raises(ConfigError) as err:
        BatchPlan.for_run(TrainConfig(batch_size=3), 12, 2, state, tmp_path)
    message = str(err.value)
    assert "\n" not in message and "with 2 process(es)" in message and "1 micro-batches of 3 records" in message
    assert "resume with [1] process(es)" in message
    state = {"world_size": 2, "rng": [{}, {}], "step": 2, "layout": {"world_size": 2, "grad_accum": 2}}
    with pytest.raises(ConfigError, match=r"cannot be shared evenly by 3 processes.*resume with \[1, 2, 4\]"):
        BatchPlan.for_run(TrainConfig(batch_size=3, grad_accum=2), 24, 3, state, tmp_path)
    # the last step of an epoch counts too: 5 micro-batches at 1 x 2 make steps of 2, 2, 1
    state = {"world_size": 1, "rng": [{}], "step": 1, "layout": {"world_size": 1, "grad_accum": 2}}
    with pytest.raises(ConfigError, match="1 in each epoch's last step"):
        BatchPlan.for_run(TrainConfig(batch_size=3, grad_accum=2), 15, 2, state, tmp_path)
    with pytest.raises(ConfigError, match=r"grad_accum changed \(2 -> 4\) while the world size changes"):
        BatchPlan.for_run(TrainConfig(batch_size=3, grad_accum=4), 24, 2, state, tmp_path)
    # a resharded run keeps its layout: 2 x 1 resumed at 1 process accumulates 2, and so does its next resume
    plan = BatchPlan.for_run(TrainConfig(batch_size=3), 12, 1, {"world_size": 2, "rng": [{}, {}], "step": 1}, None)
    assert plan.to_json() == {"world_size": 2, "grad_accum": 1} and plan.accum_at(1) == 2
    again = {"world_size": 1, "rng": [{}], "step": 2, "layout": plan.to_json()}
    assert BatchPlan.for_run(TrainConfig(batch_size=3), 12, 1, again, None).accum_at(1) == 2


def test_rank_state_at_another_world_size_keeps_the_sums_and_reseeds():
    from prefixvqa.rng import preserved, rng_state

    with preserved():
        saved = [rng_state(), rng_state()]
        state = {"rng": saved, "step": 3, "bad_train_records": [["a"], ["b", "c"]], "usable_items": [5, 7]}
        assert restore_rank_state(state, 1, 2, seed=0) == ({"b", "c"}, 7)  # same size: its own share
        assert restore_rank_state(state, 0, 1, seed=0) == ({"a", "b", "c"}, 12)  # rank 0 holds the sums
        first = torch.rand(3)
        restore_rank_state(state, 0, 1, seed=0)
        assert torch.equal(torch.rand(3), first)  # reseeded from (seed, step, rank): reproducible
        restore_rank_state(state, 1, 3, seed=0)
        assert restore_rank_state(state, 1, 3, seed=0) == (set(), 0) and not torch.equal(torch.rand(3), first)


# --------------------------------------------------------------------------------------------- torchrun, gloo, CPU
RESUMED = "RESULT completed 4"


def cut_and_resume(work: Path, name: str, procs: tuple[int, int], extra: dict, port: int) -> Path:
    """Train with procs[0] processes, SIGKILL every rank right after step 3's checkpoint (mid epoch 1), resume with
    procs[1] from that checkpoint; returns the output folder."""
    out = work / name
    killed = launch(work, out, kill_at=3, extra=extra, procs=procs[0], port=port)
    assert killed.returncode != 0, (killed.stdout + killed.stderr)[-3000:]
    state = json.loads((out / "last" / "trainer_state" / "state.json").read_text())
    assert (state["step"], state["epoch"], state["world_size"]) == (3, 1, procs[0])
    resumed = launch(work, out, extra={**extra, "resume": True}, procs=procs[1], port=port + 2)
    assert resumed.returncode == 0 and RESUMED in resumed.stdout, (resumed.stdout + resumed.stderr)[-3000:]
    state = json.loads((out / "last" / "trainer_state" / "state.json").read_text())
    assert state["world_size"] == procs[1] and state["step"] == 4 and state["layout"]["world_size"] == procs[0]
    return out


def same_schedule(a: Path, b: Path) -> None:
    sa, sb = (json.loads((f / "last" / "trainer_state" / "state.json").read_text()) for f in (a, b))
    assert sa["step"] == sb["step"] and sa["scheduler"] == sb["scheduler"] and sa["epoch"] == sb["epoch"]


@pytest.mark.slow
def test_ddp_two_processes_killed_resume_with_one(work, ddp, single):
    out = cut_and_resume(work, "ddp-2to1", (2, 1), {}, port=29561)  # grad_accum 1 at 2 ranks -> 2 at one process
    assert_close(adapter_tensors(out / "last"), adapter_tensors(single / "last"), atol=1e-6)
    assert_close(adapter_tensors(out / "last"), adapter_tensors(ddp / "last"), atol=1e-6)
    assert_close(tensors(out / "rank0.safetensors"), tensors(single / "rank0.safetensors"), atol=1e-6)
    same_schedule(out, single)


@pytest.mark.slow
def test_ddp_one_process_killed_resume_with_two(work, ddp, single):
    out = cut_and_resume(work, "ddp-1to2", (1, 2), {"grad_accum": 2}, port=29565)  # 1 x 2 -> 2 ranks x 1
    assert_close(adapter_tensors(out / "last"), adapter_tensors(ddp / "last"), atol=1e-6)
    assert_close(adapter_tensors(out / "last"), adapter_tensors(single / "last"), atol=1e-6)
    rank0, rank1 = tensors(out / "rank0.safetensors"), tensors(out / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    same_schedule(out, ddp)


@pytest.mark.slow
def test_fsdp_two_processes_killed_resume_with_one(work, single):
    """The full optimizer state (keyed by parameter name) re-shards onto a one-rank mesh (torchrun, one process)."""
    out = cut_and_resume(work, "fsdp-2to1", (2, 1), {"distributed": "fsdp"}, port=29569)
    assert_close(adapter_tensors(out / "last"), adapter_tensors(single / "last"), atol=1e-5)
    assert_close(tensors(out / "rank0.safetensors"), tensors(single / "rank0.safetensors"), atol=1e-5)
    same_schedule(out, single)


@pytest.mark.slow
def test_fsdp_one_process_killed_resume_with_two(work, single):
    out = cut_and_resume(work, "fsdp-1to2", (1, 2), {"distributed": "fsdp", "grad_accum": 2}, port=29573)
    assert_close(adapter_tensors(out / "last"), adapter_tensors(single / "last"), atol=1e-5)
    rank0, rank1 = tensors(out / "rank0.safetensors"), tensors(out / "rank1.safetensors")
    assert_close(rank0, tensors(single / "rank0.safetensors"), atol=1e-5)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    same_schedule(out, single)
