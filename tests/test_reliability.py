"""No lost work, no silent corruption: run locks, swap recovery, honest resume and failure, adapter integrity.

Each test here reproduces one failure of issue 9 (two runs into one folder, a kill between the renames of a
checkpoint swap, a resume with another recipe, exploding weights, a dataset of bad images, ...) and asserts the
guarded behaviour. The fault-injection test kills real training processes with SIGKILL at random moments.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from prefixvqa.cli import main  # noqa: E402
from prefixvqa.data.images import ImageLoadError  # noqa: E402
from prefixvqa.data.synthetic import colour_records  # noqa: E402
from prefixvqa.fileio import MANIFEST_NAME  # noqa: E402
from helpers import adapter_tensors, subprocess_env  # noqa: E402
from prefixvqa.train import TrainConfig, train  # noqa: E402
from prefixvqa.train import trainer as trainer_mod  # noqa: E402
from prefixvqa.train.checkpoint import LOCK_NAME, CheckpointError, RunLockedError, output_lock  # noqa: E402
from prefixvqa.train.recipe import build_model  # noqa: E402

FAST = {"progress": False, "tensorboard": False, "plot": False}
MODEL = {"tiny": "gpt2", "config": {"mapper": {"prefix_length": 2, "dropout": 0.1}}}
ENV = subprocess_env(TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


def fresh_model(work: Path):
    torch.manual_seed(0)
    return build_model(MODEL, work)


def assert_same_tensors(a: Path, b: Path, atol: float = 0.0) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.allclose(ta[key], tb[key], atol=atol, rtol=0), key


def state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state" / "state.json").read_text())


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


class Killed(BaseException):
    """Stands in for a kill in-process: not an Exception, so nothing on the way catches it."""


def stop_after_save(monkeypatch, step: int) -> None:
    original = trainer_mod.Trainer.save_last

    def save_then_stop(self):
        original(self)
        if self.step == step:
            raise Killed

    monkeypatch.setattr(trainer_mod.Trainer, "save_last", save_then_stop)


def cfg(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"output_dir": str(out), "epochs": 2, "batch_size": 3, "save_every_steps": 1, "seed": 3,
                          **FAST, **kw})


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------------------ locks
def test_lock_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path, caplog):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from prefixvqa.train.checkpoint import output_lock
            with output_lock({str(folder)!r}):
                print("held", flush=True)
                sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"in use by another training run \(pid {holder.pid} on host"):
            with output_lock(folder):
                pass
    finally:
        holder.communicate("\n", timeout=60)
    assert not (folder / LOCK_NAME).exists()  # released on exit

    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))  # a killed run's leftover
    with caplog.at_level("WARNING"), output_lock(folder):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with output_lock(folder):  # re-entrant in one process: a recipe and its stages nest
            pass
    assert "taking over the stale lock" in caplog.text and not lock.exists()

    lock.write_text(json.dumps({"pid": 1234, "host": "another-node"}))  # that node's run may be alive
    with pytest.raises(RunLockedError, match="another-node.*delete the lock file"):
        with output_lock(folder):
            pass


def _recipe(tmp_path: Path, out: Path, **train_kw) -> Path:
    path = tmp_path / f"recipe-{out.name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"tiny": "gpt2", "config": {"mapper": {"prefix_length": 2}}},
        "data": {"train": {"format": "synthetic", "n": 8}, "eval": {"format": "synthetic", "n": 4, "seed": 1}},
        "train": {"output_dir": str(out), "epochs": 2, "batch_size": 4, "seed": 5, **FAST, **train_kw}}))
    return path


def test_two_train_commands_into_one_folder(tmp_path, capsys):
    """A second `prefixvqa train` into a folder a running one holds refuses (exit 2, naming the holder); the first
    finishes untouched."""
    out = tmp_path / "shared"
    recipe = _recipe(tmp_path, out, epochs=2)
    first = subprocess.Popen([sys.executable, "-m", "prefixvqa.cli", "train", str(recipe)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / LOCK_NAME).is_file() or not (out / LOCK_NAME).read_text():
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.05)
        assert main(["train", str(recipe)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("prefixvqa train: error:") and f"pid {first.pid}" in err and str(out) in err
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert "final adapter" in stdout
    from prefixvqa.model import MedVQAAdapter

    MedVQAAdapter.from_pretrained(out / "best")  # complete, and verified against its manifest
    assert not (out / LOCK_NAME).exists() and not leftovers(out)


# ------------------------------------------------------------------------------------------------- swap recovery
@pytest.fixture(scope="module")
def reference(work) -> Path:
    """An uninterrupted run: 2 epochs x 4 steps, a checkpoint after every step."""
    out = work / "reference"
    train(fresh_model(work), colour_records(10), colour_records(4, seed=1), cfg(out))
    return out


def interrupted(work: Path, name: str, monkeypatch, step: int) -> Path:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    stop_after_save(monkeypatch, step)
    with pytest.raises(Killed):
        train(fresh_model(work), colour_records(10), colour_records(4, seed=1), cfg(out))
    monkeypatch.undo()
    return out


def resume(work: Path, out: Path, **kw):
    return train(fresh_model(work), colour_records(10), colour_records(4, seed=1), cfg(out, resume=True, **kw))


@pytest.mark.parametrize("left", ["old", "old+new", "old+half-new"])
def test_kill_between_the_renames_of_a_swap_resumes_from_the_newest_complete_checkpoint(work, reference, monkeypatch,
                                                                                        left):
    """What `replace_dir` leaves when killed between its two renames: `last/` gone, the previous checkpoint in
    `.last.old-*` and the new one (complete, or half-written) in `.last.tmp-*`."""
    out = interrupted(work, f"swap-{left}", monkeypatch, step=3)
    last = out / "last"
    newer = out / ".last.tmp-abcd"
    shutil.copytree(last, newer)  # stands in for the step-4 checkpoint being swapped in
    stepped = state(newer)
    stepped["step"] = 99  # recognisable: recovery must pick this one when it is complete
    (newer / "trainer_state" / "state.json").write_text(json.dumps(stepped))
    from prefixvqa.fileio import write_manifest

    write_manifest(newer)
    last.rename(out / ".last.old-1234")
    if left == "old":
        shutil.rmtree(newer)
    if left == "old+half-new":
        (newer / "adapter_model.safetensors").unlink()  # killed mid-write: its manifest no longer verifies
    if left == "old+new":  # recovery takes the complete new one; then the step mismatch proves which was used
        from prefixvqa.train.checkpoint import recover_checkpoint

        assert recover_checkpoint(last) == last and state(last)["step"] == 99 and not leftovers(out)
        return
    result = resume(work, out)
    assert result.stopped_reason == "completed" and result.global_step == 8
    assert_same_tensors(reference / "last", last)  # bit-identical
    assert not leftovers(out)


def test_resume_never_restarts_silently_over_an_unusable_checkpoint(work, reference, monkeypatch):
    out = interrupted(work, "no-state", monkeypatch, step=2)
    (out / "last" / "trainer_state" / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"last cannot be resumed: trainer_state/state.json is missing"):
        resume(work, out)
    out = interrupted(work, "flipped", monkeypatch, step=2)
    data = bytearray((out / "last" / "mapper.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (out / "last" / "mapper.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="mapper.safetensors does not match its sha256"):
        resume(work, out)
    out = interrupted(work, "damaged-old", monkeypatch, step=2)  # the only copy, moved aside and damaged
    (out / "last" / MANIFEST_NAME).write_text("{")
    (out / "last").rename(out / ".last.old-5678")
    with pytest.raises(CheckpointError, match=r"last is missing and the earlier version.*\.last\.old-5678"):
        resume(work, out)
    assert (out / ".last.old-5678").is_dir()  # evidence is kept, not deleted


def test_checkpoints_carry_a_manifest_of_every_file(reference):
    listed = json.loads((reference / "last" / MANIFEST_NAME).read_text())["files"]
    on_disk = {p.relative_to(reference / "last").as_posix() for p in (reference / "last").rglob("*")
               if p.is_file() and p.name != MANIFEST_NAME}
    assert set(listed) == on_disk and "trainer_state/state.json" in listed and "trainer_state/optimizer.safetensors" \
        in listed


# ----------------------------------------------------------------------------------------------- changed recipe
def test_resume_with_a_changed_recipe_is_refused_unless_asked(work, reference, monkeypatch):
    out = interrupted(work, "changed", monkeypatch, step=2)
    changes = [({"lr": {"mapper": 5e-3}}, [], "train.lr.mapper: 0.001 -> 0.005"),
               ({"batch_size": 2}, [], "train.batch_size: 3 -> 2"),
               ({"seed": 4}, [], "train.seed: 3 -> 4"),
               ({}, colour_records(11), "data.train.records: 10 -> 11")]
    for kw, records, expected in changes:
        with pytest.raises(CheckpointError, match="differ from the checkpoint") as caught:
            train(fresh_model(work), records or colour_records(10), colour_records(4, seed=1),
                  cfg(out, resume=True, **kw))
        assert expected in str(caught.value) and "--resume-with-changes" in str(caught.value)
    assert state(out / "last")["step"] == 2  # nothing was touched
    seen = []
    original = trainer_mod.Trainer._loop

    def spy(self, *args):
        seen.append({g["name"]: g["lr"] for g in self.optimizer.param_groups})
        return original(self, *args)

    monkeypatch.setattr(trainer_mod.Trainer, "_loop", spy)
    result = resume(work, out, lr={"mapper": 5e-3}, resume_with_changes=True, epochs=1)
    assert result.stopped_reason == "completed"
    ref_lr = state(out / "last")["optimizer"]["param_groups"]
    assert seen[0]["mapper"] > 1e-3 and {g["name"]: g["initial_lr"] for g in ref_lr}["mapper"] == 5e-3


# ---------------------------------------------------------------------------------------------- honest failure
def test_exploding_learning_rate_fails_and_publishes_nothing(tmp_path, capsys):
    out = tmp_path / "boom"
    recipe = _recipe(tmp_path, out, save_every_steps=1, lr={"mapper": 1.0e9, "lora": 1.0e9})
    assert main(["train", str(recipe)]) == 1
    err = capsys.readouterr()
    line = err.err.strip().splitlines()[-1]  # (transformers' own progress bars may come before it)
    assert line.startswith("prefixvqa train: error: non-finite") and "nothing was published" in line
    assert "final adapter" not in err.out and not (out / "best").exists()
    if (out / "last").exists():
        assert str(out / "last") in line
        assert all(torch.isfinite(v).all() for v in adapter_tensors(out / "last").values())
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "stop" and rows[-1]["reason"].startswith("non-finite")


@pytest.mark.parametrize("bad,share,fails", [(8, 0.0, True), (5, 0.5, True), (3, 0.5, False), (5, 0.3, False)])
def test_too_few_usable_images_fails_before_publishing(work, bad, share, fails):
    records = colour_records(8)
    for record in records[:bad]:
        record.image = b"not an image"
    out = work / f"usable-{bad}-{share}"
    run = lambda: train(fresh_model(work), records, None,  # noqa: E731
                        TrainConfig(output_dir=str(out), epochs=1, batch_size=4, min_usable_share=share, **FAST))
    if not fails:
        assert run().stopped_reason == "completed"
        return
    with pytest.raises(ImageLoadError, match=rf"{8 - bad} of 8 training records have a usable image"):
        run()
    assert not (out / "best").exists() and not (out / "last").exists()


# -------------------------------------------------------------------------------------------------- determinism
def test_same_recipe_and_seed_give_the_same_adapter(tmp_path):
    """`prefixvqa train` seeds the mapper and LoRA initialisation: two runs in one process (whose global random
    state differs after the first) give identical tensors; another seed gives other ones."""
    folders = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert main(["train", str(_recipe(tmp_path, tmp_path / name, epochs=1, seed=seed))]) == 0
        folders.append(tmp_path / name / "best")
    assert_same_tensors(folders[0], folders[1])
    with pytest.raises(AssertionError):
        assert_same_tensors(folders[0], folders[2])


def test_a_100k_character_question_trains_and_resumes(work, monkeypatch, caplog):
    records = colour_records(6)
    records[2].question = "is there a lesion in the image " * 3300  # ~100,000 characters
    assert len(records[2].question) > 100_000
    out = work / "long"
    shutil.rmtree(out, ignore_errors=True)
    stop_after_save(monkeypatch, 1)
    run = lambda **kw: train(fresh_model(work), records, None,  # noqa: E731
                             TrainConfig(output_dir=str(out), epochs=2, batch_size=3, save_every_steps=1, **FAST, **kw))
    with caplog.at_level("WARNING"), pytest.raises(Killed):
        run()
    monkeypatch.undo()
    assert f"record {records[2].id}: prompt longer than template.max_length" in caplog.text
    result = run(resume=True)
    assert result.stopped_reason == "completed" and result.global_step == 4


# ------------------------------------------------------------------------------------------------ fault injection
FAULT_DRIVER = textwrap.dedent("""
    import json, os, random, signal, sys, time
    import torch
    torch.set_num_threads(1)
    from pathlib import Path
    from prefixvqa import fileio
    from prefixvqa.train import TrainConfig, train
    from prefixvqa.train import trainer as T
    from prefixvqa.train.checkpoint import checkpoint_problem
    from prefixvqa.data.synthetic import colour_records
    from prefixvqa.train.recipe import build_model

    work, ref, cut, seed = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    random_kills, swap_kills = int(sys.argv[5]), int(sys.argv[6])
    MODEL = json.loads(sys.argv[7])

    def child(out, swap_kill, ready):
        # one training attempt in a forked process (imports are shared, so an attempt starts in about a second)
        if swap_kill:
            seen = [0]
            def between(old, dst):  # after the old folder moved aside, before the new one moves in
                seen[0] += 1
                if seen[0] == swap_kill:
                    os.kill(os.getpid(), signal.SIGKILL)
            fileio._between_renames = between
        loop = T.Trainer._loop
        def report_start(self, *args):  # the step this attempt resumed from, once recovery and resume are done
            os.write(ready, f"{self.step}\\n".encode())
            return loop(self, *args)
        T.Trainer._loop = report_start
        code = 0
        try:
            torch.manual_seed(0)
            model = build_model(MODEL, work)
            cfg = TrainConfig(output_dir=out, epochs=3, batch_size=2, save_every_steps=1, seed=3, resume=True,
                              progress=False, tensorboard=False, plot=False)
            train(model, colour_records(10), colour_records(4, seed=1), cfg)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 3
        os._exit(code)

    def attempt(out, swap_kill=0, kill_after=None):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            child(out, swap_kill, w)
        os.close(w)
        with os.fdopen(r) as pipe:
            started = pipe.readline()  # empty if the attempt died before training began
        t0 = time.time()
        if started and kill_after is not None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)  # a finished child is a zombie until waited for: no error
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        return code, int(started) if started.strip() else None

    def newest_complete(out):
        # the largest step of any complete checkpoint a killed attempt left (last/ or a swap's leftovers)
        steps = [json.loads((c / "trainer_state" / "state.json").read_text())["step"]
                 for c in Path(out).glob("*last*") if c.is_dir() and checkpoint_problem(c) is None]
        return max(steps, default=0)

    build_model(MODEL, work)  # imports everything the attempts need once, here: forked attempts start at once
    import accelerate.utils, safetensors.torch, tqdm.auto  # noqa: E401, F401
    t0 = time.time()
    code, _ = attempt(ref)
    span = time.time() - t0
    assert code == 0, code
    rng = random.Random(seed)
    plan = ["swap"] * swap_kills + ["random"] * random_kills
    rng.shuffle(plan)
    report = {"span": span, "random": 0, "swap": 0, "codes": [], "resumed": []}
    for kind in plan:
        expected = newest_complete(cut)
        if kind == "swap":
            code, resumed = attempt(cut, swap_kill=rng.randint(1, 2))
        else:
            code, resumed = attempt(cut, kill_after=rng.uniform(0.0, span / 10))
        report["codes"].append(code)
        report["resumed"].append(resumed)
        assert resumed is None or resumed == expected, ("resumed from", resumed, "newest complete", expected)
        assert code in (0, -9), code
        if code == 0:
            break
        report[kind] += 1
    expected = newest_complete(cut)
    code, resumed = attempt(cut)
    assert code == 0 and resumed == expected, (code, resumed, expected)
    print("REPORT " + json.dumps(report))
""")


@pytest.mark.slow
def test_sigkill_at_random_moments_and_between_swap_renames_always_resumes_to_the_same_result(work):
    """Real SIGKILLs, many times: at random moments of training and saving, and exactly between the two renames of
    a checkpoint swap. Every attempt resumes from what the last one left (taking over its stale lock, recovering
    its half-swapped checkpoint); the final checkpoints equal those of an uninterrupted run."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    ref, cut = work / "fault-ref", work / "fault-cut"
    script = work / "fault_driver.py"
    script.write_text(FAULT_DRIVER)
    run = subprocess.run([sys.executable, str(script), str(work), str(ref), str(cut), "7", "20", "6",
                          json.dumps(MODEL)], capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    report = json.loads(run.stdout.split("REPORT ", 1)[1])
    print(json.dumps(report))
    assert report["swap"] >= 4 and report["random"] + report["swap"] >= 15, report  # the kills really happened
    for name in ("last", "best"):
        assert_same_tensors(ref / name, cut / name)  # bit-identical
    a, b = state(ref / "last"), state(cut / "last")
    assert a["step"] == b["step"] == 15 and a["scheduler"] == b["scheduler"] and a["rng"] == b["rng"]
    assert a["best_metric"] == b["best_metric"]
    assert not leftovers(cut) and not (cut / LOCK_NAME).exists()


def test_a_half_written_best_leftover_is_never_promoted(tmp_path):
    """A kill while the first best/ was written leaves .best.tmp-* without a manifest: it is removed, not used."""
    from prefixvqa.train.checkpoint import recover_checkpoint

    half = tmp_path / ".best.tmp-1"
    half.mkdir()
    (half / "prefixvqa_config.json").write_text("{}")
    assert recover_checkpoint(tmp_path / "best", trainer_state=False) is None
    assert not any(tmp_path.iterdir())
