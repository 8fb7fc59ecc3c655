"""Nothing of the user's is lost: every command and API that writes replaces a path only when prefixvqa wrote what is
there; a full disk or a read-only disk gives one line naming the path the user gave, and the previous state stays."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

from prefixvqa import MedVQAAdapter
from prefixvqa.cli import main
from prefixvqa.config import AdapterConfig
from prefixvqa.fileio import MANIFEST_NAME, OverwriteRefused, atomic_write, verify_manifest
from prefixvqa.testing import TINY_ENCODER

ENOSPC_MESSAGE = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors 0.8 on a
# full tmpfs (checked with `mount -t tmpfs -o size=64k`): a SafetensorError, not an OSError


@pytest.fixture(scope="module")
def env(tiny_decoders, tmp_path_factory) -> dict[str, Path]:
    """A saved LoRA adapter (exportable) and a labelled JSONL dataset of three images."""
    root = tmp_path_factory.mktemp("writes")
    cfg = AdapterConfig.from_dict({"encoder": TINY_ENCODER, "decoder": {"name": str(tiny_decoders["gpt2"])},
                                   "tuning": {"mode": "lora"}})
    adapter = MedVQAAdapter(cfg).save_pretrained(root / "adapter")
    rows = []
    for i in range(3):
        Image.new("L", (32, 32), 60 * i).save(root / f"img{i}.png")
        rows.append({"id": f"r{i}", "image": str(root / f"img{i}.png"), "question": "is it bright?",
                     "answer": "yes" if i else "no"})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = root / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": {"tiny": "gpt2", "config": {"mapper": {"prefix_length": 2}}},
        "data": {"train": {"format": "synthetic", "n": 8, "seed": 0, "kind": "vqa"},
                 "eval": {"format": "synthetic", "n": 4, "seed": 1, "kind": "vqa"}},
        "train": {"epochs": 1, "batch_size": 4, "progress": False, "tensorboard": False, "plot": False,
                  "eval_every_epoch": False}}))
    return {"adapter": adapter, "data": data, "recipe": recipe, "root": root}


def cli(argv: list[str], capsys: Any) -> tuple[int, str]:
    """Exit status and stderr of one in-process CLI run."""
    capsys.readouterr()
    status = main(argv)
    return status, capsys.readouterr().err


def one_line(err: str) -> str:
    """The CLI's error line; there must be exactly one, and no traceback (progress bars and warnings may precede)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("prefixvqa ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------- the writers, one table
def _save_pretrained(env: dict[str, Path], target: Path, capsys: Any) -> None:
    MedVQAAdapter.from_pretrained(env["adapter"]).save_pretrained(target)


def _export(env: dict[str, Path], target: Path, capsys: Any) -> None:
    status, err = cli(["export", str(env["adapter"]), "--merge", "--out", str(target)], capsys)
    if status:
        raise OverwriteRefused(one_line(err))


def _eval(env: dict[str, Path], target: Path, capsys: Any) -> None:
    status, err = cli(["eval", "--adapter", str(env["adapter"]), "--data", str(env["data"]), "--out", str(target)],
                      capsys)
    if status:
        raise OverwriteRefused(one_line(err))


def _predict(env: dict[str, Path], target: Path, capsys: Any) -> None:
    status, err = cli(["predict", "--adapter", str(env["adapter"]), "--data", str(env["data"]), "--out",
                       str(target), "--max-new-tokens", "2"], capsys)
    if status:
        raise OverwriteRefused(one_line(err))


def _cache(env: dict[str, Path], target: Path, capsys: Any) -> None:
    status, err = cli(["cache-features", "--adapter", str(env["adapter"]), "--data", str(env["data"]), "--out",
                       str(target)], capsys)
    if status:
        raise OverwriteRefused(one_line(err))


def _sweep(env: dict[str, Path], target: Path, capsys: Any) -> None:
    from prefixvqa.sweep import sweep

    sweep(env["recipe"], train_sizes=[4], seeds=1, out_dir=target, batch_size=4)


def _checkpoint(env: dict[str, Path], target: Path, capsys: Any) -> None:
    """train's output_dir: the checkpoint folders it replaces (`best/`, `last/`)."""
    from prefixvqa.train.checkpoint import write_checkpoint

    write_checkpoint(MedVQAAdapter.from_pretrained(env["adapter"]), target, {"step": 1}, None)


def _save_calibration(env: dict[str, Path], target: Path, capsys: Any) -> None:
    import shutil

    from prefixvqa.adapter_io import save_calibration
    from prefixvqa.calibration import Calibration

    if not target.exists():  # "prefixvqa wrote it": a copy of a saved adapter
        shutil.copytree(env["adapter"], target)
    save_calibration(target, Calibration(temperature_generate=2.0))


def _explain(env: dict[str, Path], target: Path, capsys: Any) -> None:
    status, err = cli(["answer", "--adapter", str(env["adapter"]), "--image", str(env["root"] / "img1.png"),
                       "is it bright?", "--max-new-tokens", "2", "--explain", str(target)], capsys)
    if status:
        raise OverwriteRefused(one_line(err))


def _train(env: dict[str, Path], target: Path, capsys: Any) -> None:
    status, err = cli(["train", str(env["recipe"]), "--set", f"train.output_dir={target}"], capsys)
    if status:
        raise OverwriteRefused(one_line(err))


# name -> (writer, the user's thing in the way is a file (not a folder), what a second write leaves to recognise)
WRITERS: dict[str, tuple[Callable[..., None], bool, str]] = {
    "save_pretrained": (_save_pretrained, False, MANIFEST_NAME),
    "export --merge --out": (_export, False, "decoder"),
    "eval --out": (_eval, False, "metrics.json"),
    "predict --out": (_predict, True, ""),
    "cache-features --out": (_cache, False, ""),
    "sweep --out": (_sweep, False, "sweep.json"),
    "train output_dir (checkpoint)": (_checkpoint, False, "trainer_state"),
    "save_calibration": (_save_calibration, False, "calibration.json"),
    "answer --explain": (_explain, True, ""),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_users_path_is_refused_by_name_and_a_prefixvqa_one_is_replaced(env, tmp_path, capsys, name):
    write, is_file, mark = WRITERS[name]
    mine = tmp_path / ("mine.jsonl" if is_file else "mine")
    if is_file:
        mine.write_text('{"id": "1", "note": "my own notes"}\n')
    else:
        mine.mkdir()
        (mine / "notes.txt").write_text("my own notes")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    with pytest.raises(OverwriteRefused) as refused:
        write(env, mine, capsys)
    message = str(refused.value)
    assert "\n" not in message and str(mine) in message, message
    assert (mine.read_text() if is_file else (mine / "notes.txt").read_text()).endswith(
        "my own notes" if not is_file else 'notes"}\n')
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before  # nothing written

    ours = tmp_path / ("ours" + (".png" if write is _explain else ".jsonl") if is_file else "ours")
    write(env, ours, capsys)
    first = ours.stat().st_mtime_ns if is_file else None
    write(env, ours, capsys)  # prefixvqa wrote it: replaced (or added to) without a word
    assert ours.exists() and (not mark or (ours / mark).exists())
    if is_file and ours.suffix == ".jsonl":
        assert ours.stat().st_mtime_ns >= first and all("guess" in json.loads(x) for x in ours.read_text().split("\n")
                                                         if x)
    if (ours / MANIFEST_NAME).is_file():
        verify_manifest(ours, extra_ok=False)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name or ".old-" in p.name]


def test_notes_added_to_an_adapter_stop_save_pretrained_and_name_the_file(env, tmp_path):
    target = MedVQAAdapter.from_pretrained(env["adapter"]).save_pretrained(tmp_path / "a")
    (target / "my-notes.md").write_text("results of my study")
    with pytest.raises(OverwriteRefused, match=r"my-notes\.md"):
        MedVQAAdapter.from_pretrained(env["adapter"]).save_pretrained(target)
    assert (target / "my-notes.md").read_text() == "results of my study"


def test_export_onto_the_adapter_itself_is_refused(env, tmp_path, capsys):
    import shutil

    adapter = Path(shutil.copytree(env["adapter"], tmp_path / "adapter"))
    status, err = cli(["export", str(adapter), "--merge", "--out", str(adapter)], capsys)
    assert status == 2 and str(adapter) in one_line(err) and "not an earlier merged export" in err
    verify_manifest(adapter, extra_ok=False)


def test_save_calibration_keeps_every_file_of_the_folder(env, tmp_path):
    import shutil

    from prefixvqa.adapter_io import save_calibration
    from prefixvqa.calibration import Calibration

    adapter = Path(shutil.copytree(env["adapter"], tmp_path / "adapter"))
    (adapter / ".my-hidden-notes").write_text("kept")
    save_calibration(adapter, Calibration(temperature_generate=2.0))
    assert (adapter / ".my-hidden-notes").read_text() == "kept" and (adapter / "calibration.json").is_file()
    verify_manifest(adapter)


# --------------------------------------------------------------------------------------- predict: never the input
def test_predict_onto_its_own_input_is_refused_naming_both(env, tmp_path, capsys):
    import shutil

    data = Path(shutil.copy(env["data"], tmp_path / "data.jsonl"))
    before = data.read_bytes()
    status, err = cli(["predict", "--adapter", str(env["adapter"]), "--data", str(data), "--out", str(data)], capsys)
    line = one_line(err)
    assert status == 2 and line.count(str(data)) == 2 and "input" in line, line
    assert data.read_bytes() == before
    # the same file under another name (a hard link), and an input that is itself a predictions file
    assert cli(["predict", "--adapter", str(env["adapter"]), "--data", str(data), "--out", str(tmp_path / "p.jsonl"),
                "--max-new-tokens", "2"], capsys)[0] == 0
    (tmp_path / "link.jsonl").hardlink_to(tmp_path / "p.jsonl")
    predictions = (tmp_path / "p.jsonl").read_bytes()
    status, err = cli(["predict", "--adapter", str(env["adapter"]), "--data", str(tmp_path / "p.jsonl"), "--out",
                       str(tmp_path / "link.jsonl")], capsys)
    line = one_line(err)
    assert status == 2 and str(tmp_path / "link.jsonl") in line and str(tmp_path / "p.jsonl") in line, line
    assert (tmp_path / "p.jsonl").read_bytes() == predictions


def test_write_predictions_api_refuses_inputs_and_foreign_files_unless_asked(tmp_path):
    from prefixvqa.predict import write_predictions

    data = tmp_path / "data.jsonl"
    data.write_text('{"id": "1", "image": "x.png", "question": "q"}\n')
    with pytest.raises(OverwriteRefused, match="input"):
        write_predictions([], data, inputs=[data], overwrite=True)  # an input is never replaced
    with pytest.raises(OverwriteRefused, match="not a predictions file"):
        write_predictions([], data)
    assert data.read_text().startswith('{"id": "1"')
    write_predictions([], data, overwrite=True)  # the caller asked explicitly
    assert data.read_text() == ""


# ------------------------------------------------------------------------------------- full disk: one line, old kept
def _full_disk(monkeypatch: pytest.MonkeyPatch, only: str = "") -> list[str]:
    """Make every safetensors write (ours, peft's and transformers') fail as safetensors does on a full disk; with
    ``only``, just the writes to file names containing it. Returns the file names attempted."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.serialize_file
    attempted: list[str] = []

    def full(tensors: Any, filename: str, metadata: Any = None) -> None:
        attempted.append(str(filename))
        if only in str(filename):
            raise SafetensorError(ENOSPC_MESSAGE)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "serialize_file", full)
    return attempted


def _same_files(folder: Path, before: dict[str, bytes]) -> None:
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_full_disk_during_export_is_one_line_naming_the_folder_and_keeps_the_old_export(env, tmp_path, capsys,
                                                                                      monkeypatch):
    out = tmp_path / "merged"
    assert cli(["export", str(env["adapter"]), "--merge", "--out", str(out)], capsys)[0] == 0
    before = _snapshot(out)
    attempted = _full_disk(monkeypatch)
    status, err = cli(["export", str(env["adapter"]), "--merge", "--out", str(out)], capsys)
    line = one_line(err)
    assert status == 2 and attempted, err
    assert "No space left on device" in line and str(out) in line and ".tmp" not in line, line
    _same_files(out, before)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_full_disk_during_save_pretrained_names_the_folder_and_keeps_the_old_adapter(env, tmp_path, monkeypatch):
    model = MedVQAAdapter.from_pretrained(env["adapter"])
    target = model.save_pretrained(tmp_path / "adapter")
    before = _snapshot(target)
    _full_disk(monkeypatch, only="mapper.safetensors")
    with pytest.raises(OSError) as failed:
        model.save_pretrained(target)
    assert failed.value.errno == errno.ENOSPC and not isinstance(failed.value, OverwriteRefused)
    text = str(failed.value)
    assert "\n" not in text and str(target) in text and ".tmp" not in text, text
    _same_files(target, before)
    MedVQAAdapter.from_pretrained(target)  # still loads


def test_full_disk_at_the_checkpoint_optimizer_write_stops_train_with_one_line(env, tmp_path, capsys, monkeypatch):
    import yaml

    recipe = yaml.safe_load(env["recipe"].read_text())
    recipe["train"]["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    assert cli(["train", str(path)], capsys)[0] == 0
    checkpoints = [p for p in (tmp_path / "run").rglob("last") if p.is_dir()]
    assert checkpoints, list((tmp_path / "run").rglob("*"))
    last = checkpoints[0]
    before = _snapshot(last)
    attempted = _full_disk(monkeypatch, only="optimizer.safetensors")
    status, err = cli(["train", str(path)], capsys)  # train.resume is false: a fresh run replaces last/
    line = one_line(err)
    assert status == 2 and any("optimizer" in a for a in attempted), err
    assert "No space left on device" in line and str(last) in line and ".tmp" not in line, line
    _same_files(last, before)


def _mount(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """A real tmpfs of 4 MiB where the machine allows mounting one (root), else the test is skipped."""
    folder = tmp_path / "disk"
    if not _mount(folder, "size=4m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_real_full_disk_during_save_pretrained(env, tmpfs):
    model = MedVQAAdapter.from_pretrained(env["adapter"])
    target = model.save_pretrained(tmpfs / "adapter")
    before = _snapshot(target)
    filler = tmpfs / "filler"
    try:  # fill the disk to the last block
        with open(filler, "wb", buffering=0) as fh:
            while True:
                fh.write(b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    with pytest.raises(OSError) as failed:
        model.save_pretrained(target)
    text = str(failed.value)
    assert failed.value.errno == errno.ENOSPC and "\n" not in text and str(target) in text and ".tmp" not in text
    _same_files(target, before)


# --------------------------------------------------------------------------------- read-only disk: the output named
@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
def test_a_read_only_disk_names_the_output_and_the_temporary_name_has_one_suffix(tmp_path, monkeypatch, disk):
    import os

    import prefixvqa.fileio as fileio

    names: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(fileio.os, "replace", lambda src, dst: (names.append(Path(src).name), real_replace(src, dst)))
    atomic_write(tmp_path / "p.jsonl", "x\n")
    assert len(names) == 1 and names[0].startswith(".p.jsonl.") and names[0].endswith(".tmp"), names
    assert ".tmp.tmp" not in names[0] and names[0].count(".tmp") == 1
    monkeypatch.undo()

    folder = tmp_path / "ro"
    if disk == "tmpfs":
        if not _mount(folder, "size=1m,ro"):
            pytest.skip("cannot mount a tmpfs here (needs root)")
        try:
            check_read_only(folder / "p.jsonl")
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    else:  # what open() raises on a read-only file system, naming the temporary file
        real_open = open

        def read_only(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if "x" in mode or "w" in mode:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
            return real_open(file, mode, *args, **kwargs)

        folder.mkdir()
        monkeypatch.setattr(fileio, "open", read_only, raising=False)
        check_read_only(folder / "p.jsonl")


def check_read_only(out: Path) -> None:
    from prefixvqa.predict import write_predictions

    with pytest.raises(OSError) as failed:
        write_predictions([{"id": "1", "answer": "yes"}], out)
    text = str(failed.value)
    assert failed.value.errno == errno.EROFS and str(out) in text and ".tmp" not in text, text
    assert failed.value.filename == str(out)


def test_an_overlay_onto_its_own_input_image_is_refused_and_the_api_asks_too(env, tmp_path, capsys):
    from prefixvqa.explain import explain, is_explain_png

    image = tmp_path / "scan.png"
    Image.new("L", (32, 32), 90).save(image)
    before = image.read_bytes()
    status, err = cli(["answer", "--adapter", str(env["adapter"]), "--image", str(image), "is it bright?",
                       "--explain", str(image)], capsys)
    assert status == 2 and "is the input image" in one_line(err) and image.read_bytes() == before
    model = MedVQAAdapter.from_pretrained(env["adapter"])
    with pytest.raises(OverwriteRefused, match="grounding overlay"):
        explain(model, str(env["root"] / "img0.png"), "is it bright?", tmp_path / "scan.png")
    assert image.read_bytes() == before and not is_explain_png(image)
    explain(model, str(env["root"] / "img0.png"), "is it bright?", image, overwrite=True)  # asked: replaced
    assert is_explain_png(image)


def test_calibration_save_refuses_a_users_file_of_its_name_and_replaces_its_own(tmp_path):
    from prefixvqa.calibration import CALIBRATION_NAME, Calibration

    (tmp_path / CALIBRATION_NAME).write_text('{"my": "settings"}')
    with pytest.raises(OverwriteRefused, match=CALIBRATION_NAME):
        Calibration(temperature_generate=2.0).save(tmp_path)
    assert (tmp_path / CALIBRATION_NAME).read_text() == '{"my": "settings"}'
    other = tmp_path / "other"
    other.mkdir()
    Calibration(temperature_generate=2.0).save(other)
    Calibration(temperature_generate=3.0).save(other)
    assert Calibration.load(other).temperature_generate == 3.0


def test_demo_refuses_a_users_folder_before_building_anything(tmp_path, capsys, monkeypatch):
    import prefixvqa.demo as demo

    monkeypatch.setattr(demo, "build_demo_data", lambda *a, **k: pytest.fail("built data before checking the folder"))
    for part, name in (("eval", "notes.txt"), ("adapter", "notes.txt"), ("run", "log.jsonl")):
        out = tmp_path / f"demo-{part}"
        (out / part).mkdir(parents=True)
        (out / part / name).write_text("mine")
        status, err = cli(["demo", "--out", str(out)], capsys)
        assert status == 2 and str(out / part) in one_line(err), err
        assert (out / part / name).read_text() == "mine"


@pytest.mark.parametrize("name", ["log.jsonl", "loss.png", "last", "best"])
def test_train_refuses_a_users_file_of_a_name_it_writes_and_keeps_other_files(env, tmp_path, capsys, name):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "recipe-notes.yaml").write_text("mine")  # kept beside the runs: never touched
    mine = out / name
    mine.mkdir() if name in ("last", "best") else mine.write_text('{"my": "log"}\n')
    if mine.is_dir():
        (mine / "thesis.tex").write_text("mine")
    with pytest.raises(OverwriteRefused, match=name):
        _train(env, out, capsys)
    assert sorted(p.name for p in out.iterdir()) == sorted(["recipe-notes.yaml", name])
    if name != "log.jsonl":
        return
    mine.unlink()
    _train(env, out, capsys)  # no clash: the run writes beside the user's file, and again over its own entries
    _train(env, out, capsys)
    assert (out / "recipe-notes.yaml").read_text() == "mine" and (out / "last").is_dir()
