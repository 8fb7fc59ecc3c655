"""The adapter hub: round trip through a local folder and an fsspec URL, refusal of tampered / truncated files and of
names that would escape the hub root, base-model compatibility, Hugging Face push/pull, and several adapters switched
per request on one loaded base model; and nothing lost or wrong: pulls never replace a folder of the user's own, damaged
or merged indexes are refused by entry, and what a killed push left is cleaned."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from prefixvqa import MedVQAAdapter
from prefixvqa.adapter_io import AdapterLoadError
from prefixvqa.config import AdapterConfig
from prefixvqa.fileio import MANIFEST_NAME
from prefixvqa.hub import INDEX_NAME, Hub, HubError, hf_model_card, parse_ref, pull_from_hf, push_to_hf
from prefixvqa.testing import tiny_overrides

IMAGES = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))]
QUESTIONS = ["is there a lesion?", "which organ?"]


def perturb(model: MedVQAAdapter, seed: int) -> MedVQAAdapter:
    """Different trained weights (LoRA B starts at zero, so an untouched adapter would equal the base)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.parameter_groups()["lora"] + model.parameter_groups()["mapper"]:
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_decoders):
    """Two adapters (different weights, and one trains its image tower) on the same tiny base models."""
    root = tmp_path_factory.mktemp("hub_adapters")
    over = tiny_overrides(tiny_decoders["gpt2"])
    folders = {}
    for name, seed, extra in (("alpha", 1, {}), ("beta", 2, {"encoder": {**over["encoder"], "freeze": False}})):
        model = perturb(MedVQAAdapter(AdapterConfig().replace(**{**over, **extra}, name=name)), seed)
        if extra:
            with torch.no_grad():
                for p in model.encoder.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        folders[name] = model.save_pretrained(root / name, card={"metrics": {"closed_accuracy_strict": 0.5 + seed / 10,
                                                                            "protocol": "llava_med"}})
    return folders


def answers_of(model: MedVQAAdapter) -> list[tuple[str, float]]:
    return [(a.text, a.score) for a in model.answer(IMAGES, QUESTIONS, max_new_tokens=3)]


def test_local_hub_round_trip(adapters, tmp_path, capsys, monkeypatch):
    from prefixvqa.cli import main

    hub = Hub(tmp_path / "hub")
    assert hub.push(adapters["alpha"]) == "alpha@1"
    assert hub.push(adapters["alpha"]) == "alpha@2"  # versions count up
    assert hub.push(adapters["beta"], name="beta", version="v1.0") == "beta@v1.0"
    with pytest.raises(HubError, match="already in the hub"):
        hub.push(adapters["beta"], name="beta", version="v1.0")
    rows = {r["ref"]: r for r in hub.list()}
    assert set(rows) == {"alpha@1", "alpha@2", "beta@v1.0"}
    assert rows["alpha@1"]["available"] and rows["alpha@1"]["task"] == "llava_med"
    assert rows["alpha@1"]["metrics"]["closed_accuracy_strict"] == pytest.approx(0.6)
    assert Path(rows["beta@v1.0"]["decoder"]).exists() and rows["beta@v1.0"]["encoder"] == "ViT-B-32"
    index = json.loads((tmp_path / "hub" / INDEX_NAME).read_text())
    entry = index["adapters"]["alpha"]["1"]
    assert {"mapper.safetensors", "adapter_model.safetensors", MANIFEST_NAME} <= set(entry["files"])
    assert all(len(meta["sha256"]) == 64 for meta in entry["files"].values())
    assert entry["base_models"]["decoder"]["fingerprint"]

    pulled = hub.pull("alpha", tmp_path / "pulled")  # latest version
    assert answers_of(MedVQAAdapter.from_pretrained(pulled)) == answers_of(MedVQAAdapter.from_pretrained(
        adapters["alpha"]))
    assert hub.verify() == []

    # the default hub (checkpoints/ or $PREFIXVQA_HUB) serves names to from_pretrained and the CLI
    monkeypatch.setenv("PREFIXVQA_HUB", str(tmp_path / "hub"))
    model = MedVQAAdapter.from_pretrained("beta@v1.0")
    assert model.config.name == "beta"
    assert main(["hub", "push", str(adapters["alpha"]), "--name", "gamma", "--task", "lesions"]) == 0
    assert "gamma@1" in capsys.readouterr().out
    assert main(["hub", "list"]) == 0 and "gamma@1" in capsys.readouterr().out
    assert main(["hub", "verify"]) == 0 and "OK" in capsys.readouterr().out
    assert main(["hub", "pull", "alpha@1", "--to", str(tmp_path / "cli_pull")]) == 0
    assert (tmp_path / "cli_pull" / "mapper.safetensors").is_file()
    assert main(["hub", "pull", "alpha@9"]) == 2 and "no version '9'" in capsys.readouterr().err


def test_concurrent_pushes_get_distinct_versions(adapters, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    hub = Hub(tmp_path / "hub")
    with ThreadPoolExecutor(4) as pool:
        refs = list(pool.map(lambda _: hub.push(adapters["alpha"], name="alpha"), range(4)))
    assert sorted(refs) == [f"alpha@{v}" for v in range(1, 5)]
    assert sorted(hub.index()["adapters"]["alpha"]) == ["1", "2", "3", "4"] and hub.verify() == []


def test_fsspec_hub_round_trip(adapters, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXVQA_CACHE", str(tmp_path / "cache"))
    hub = Hub(f"memory://prefixvqa-test-{os.getpid()}")
    ref = hub.push(adapters["alpha"], name="alpha")
    folder = hub.resolve(ref)  # a remote hub pulls into the cache, checking every file
    assert tmp_path / "cache" in folder.parents
    assert folder.is_dir() and answers_of(MedVQAAdapter.from_pretrained(folder)) == answers_of(
        MedVQAAdapter.from_pretrained(adapters["alpha"]))
    assert hub.verify() == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "replace_with_manifest"])
def test_tampered_or_truncated_files_are_refused_by_name(adapters, tmp_path, damage):
    hub = Hub(tmp_path / "hub")
    ref = hub.push(adapters["alpha"], name="alpha")
    target = tmp_path / "hub" / "alpha" / "1" / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-100]))
    else:  # the weights *and* the folder's manifest replaced consistently: only the hub index still knows
        from prefixvqa.fileio import write_manifest

        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        write_manifest(target.parent)
    for action in (lambda: hub.pull(ref, tmp_path / "out"), lambda: hub.resolve(ref)):
        with pytest.raises(HubError, match="adapter_model.safetensors"):
            action()
    assert not (tmp_path / "out").exists()  # nothing half-pulled is left behind
    problems = hub.verify()
    assert any("adapter_model.safetensors" in p for p in problems)
    if damage != "replace_with_manifest":  # loading the folder directly is refused by its own manifest
        with pytest.raises(AdapterLoadError, match="adapter_model.safetensors"):
            MedVQAAdapter.from_pretrained(target.parent)


def test_names_and_index_paths_cannot_escape_the_hub_root(adapters, tmp_path):
    hub = Hub(tmp_path / "hub")
    for bad in ("../evil", "a/b", "..", ".hidden", "x" * 101, "a\\b", "/abs", "ends."):
        with pytest.raises(HubError, match="not allowed"):
            hub.push(adapters["alpha"], name=bad)
    with pytest.raises(HubError, match="not allowed"):
        hub.push(adapters["alpha"], name="ok", version="../1")
    with pytest.raises(HubError, match="not allowed"):
        parse_ref("ok@../../etc")
    ref = hub.push(adapters["alpha"], name="ok")
    # an index edited to point a file outside the folder is refused before anything is read or written
    index_path = tmp_path / "hub" / INDEX_NAME
    index = json.loads(index_path.read_text())
    files = index["adapters"]["ok"]["1"]["files"]
    files["../../../outside.txt"] = files.pop("README.md")
    index_path.write_text(json.dumps(index))
    with pytest.raises(HubError, match="outside the adapter folder"):
        hub.pull(ref, tmp_path / "out")
    # a version folder that is a symlink to elsewhere is outside the root too
    index["adapters"]["ok"]["1"]["files"]["README.md"] = files.pop("../../../outside.txt")
    index["adapters"]["ok"]["2"] = index["adapters"]["ok"]["1"]
    index_path.write_text(json.dumps(index))
    os.symlink(adapters["alpha"], tmp_path / "hub" / "ok" / "2")
    with pytest.raises(HubError, match="outside the hub root"):
        hub.resolve("ok@2")


def test_base_model_compatibility_is_checked_before_loading(adapters, tmp_path):
    hub = Hub(tmp_path / "hub")
    ref = hub.push(adapters["alpha"], name="alpha")
    index_path = tmp_path / "hub" / INDEX_NAME
    index = json.loads(index_path.read_text())
    index["adapters"]["alpha"]["1"]["config"]["decoder"]["name"] = str(tmp_path / "no-such-decoder")
    index_path.write_text(json.dumps(index))
    row = hub.list()[0]
    assert not row["available"] and "no-such-decoder" in row["missing"]
    with pytest.raises(HubError, match="not available here.*no-such-decoder"):
        hub.resolve(ref)


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi (no network): records the calls and stores each upload as the Hub's
    cache layout (``models--org--name/snapshots/<commit>/``, ``refs/main``) under a local folder, which the real
    ``snapshot_download(local_files_only=True, cache_dir=...)`` then reads back: a local folder remote."""

    def __init__(self, remote: Path):
        self.remote, self.calls = remote, []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, *, folder_path, repo_id, repo_type, revision, commit_message):
        import hashlib
        import shutil

        self.calls.append(("upload_folder", {"repo_id": repo_id, "repo_type": repo_type, "revision": revision,
                                             "files": sorted(p.name for p in Path(folder_path).iterdir())}))
        commit = hashlib.sha1(commit_message.encode() + repo_id.encode()).hexdigest()
        repo = self.remote / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(folder_path, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / (revision or "main")).write_text(commit)
        return f"https://huggingface.co/{repo_id}/commit/{commit}"


def test_hugging_face_push_and_pull_with_model_card(adapters, tmp_path):
    from huggingface_hub import ModelCard

    api = RecordingHfApi(tmp_path / "remote")
    url = push_to_hf(adapters["alpha"], "lab/alpha-adapter", api=api)
    assert url.startswith("https://huggingface.co/lab/alpha-adapter/commit/")
    (name, create), (_, upload) = api.calls
    assert name == "create_repo" and create["repo_id"] == "lab/alpha-adapter" and create["private"] is True
    assert upload["repo_type"] == "model" and {"README.md", MANIFEST_NAME, "adapter_model.safetensors"} <= set(
        upload["files"])
    folder = pull_from_hf("lab/alpha-adapter", cache_dir=tmp_path / "remote", local_files_only=True)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "prefixvqa" and "medical-vqa" in card.data.tags
    assert card.data.pipeline_tag == "visual-question-answering" and "closed_accuracy_strict" in card.data.metrics
    assert card.data.base_model is None  # the tiny decoder is a local folder, not a hub id
    assert "Intended use and limits" in card.text
    assert answers_of(MedVQAAdapter.from_pretrained(folder)) == answers_of(MedVQAAdapter.from_pretrained(
        adapters["alpha"]))
    # a file changed on the remote side is refused by name
    weights = folder / "mapper.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(HubError, match="mapper.safetensors"):
        pull_from_hf("lab/alpha-adapter", cache_dir=tmp_path / "remote", local_files_only=True)
    assert "base_model: gpt2" in str(hf_model_card_for(adapters["alpha"], tmp_path, "gpt2"))


def hf_model_card_for(folder: Path, tmp_path: Path, decoder: str):
    """The card of a copy whose decoder is a hub id: base_model is filled in."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "prefixvqa_config.json").read_text())
    cfg["decoder"]["name"] = decoder
    (copy / "prefixvqa_config.json").write_text(json.dumps(cfg))
    return hf_model_card(copy)


def test_adapters_switch_per_request_on_one_base(adapters, monkeypatch):
    import prefixvqa.model as model_module
    from prefixvqa.adapter_set import AdapterSet

    alone = {name: answers_of(MedVQAAdapter.from_pretrained(folder)) for name, folder in adapters.items()}
    assert alone["alpha"] != alone["beta"]
    loads = []
    real_load = model_module.load_decoder
    monkeypatch.setattr(model_module, "load_decoder", lambda cfg: loads.append(cfg) or real_load(cfg))
    group = AdapterSet.load(adapters["alpha"], name="alpha")
    decoder = group.model.decoder
    group.add(adapters["beta"], name="beta")
    assert group.names == ["alpha", "beta"] and set(decoder.peft_config) == {"default", "adapter_1"}
    for name in ("beta", "alpha", "beta", "alpha"):  # switched per request, back and forth
        with group.using(name) as model:
            got = answers_of(model)
        assert [t for t, _ in got] == [t for t, _ in alone[name]]
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(got, alone[name]))
    assert len(loads) == 1 and group.model.decoder is decoder  # the base decoder was loaded once
    with pytest.raises(AdapterLoadError, match="already loaded"):
        group.add(adapters["beta"], name="beta")


def test_adapter_on_another_base_cannot_join(adapters, other_gpt2, tmp_path):
    from prefixvqa.adapter_set import AdapterSet

    other = MedVQAAdapter(AdapterConfig().replace(**tiny_overrides(other_gpt2))).save_pretrained(tmp_path / "o")
    group = AdapterSet.load(adapters["alpha"], name="alpha")
    with pytest.raises(AdapterLoadError, match="another decoder"):
        group.add(other, name="other")


# ------------------------------------------------------------------------------------ nothing lost, nothing wrong
def test_pull_never_replaces_a_folder_of_the_users_own(adapters, tmp_path, capsys):
    from prefixvqa.cli import main

    hub = Hub(tmp_path / "hub")
    hub.push(adapters["alpha"], name="alpha")
    hub.push(adapters["beta"], name="alpha")
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("a week of work")
    (mine / "sub" / ".env").write_text("hidden files count too")
    assert main(["hub", "pull", "alpha@1", "--hub", str(tmp_path / "hub"), "--to", str(mine)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(mine) in err and "--force" in err
    assert (mine / "notes.txt").read_text() == "a week of work" and (mine / "sub" / ".env").is_file()
    with pytest.raises(HubError, match="not an earlier adapter"):
        hub.pull("alpha@1", mine)
    with pytest.raises(HubError, match="not a folder"):  # a file is never replaced by a folder
        hub.pull("alpha@1", mine / "notes.txt", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "mine"]  # no hidden leftovers either

    # an earlier pull (its manifest proves prefixvqa wrote every file) and an empty folder are replaced
    pulled = hub.pull("alpha@1", tmp_path / "pulled")
    assert hub.pull("alpha@2", pulled) == pulled
    assert (pulled / "prefixvqa_config.json").read_bytes() == (adapters["beta"] / "prefixvqa_config.json").read_bytes()
    (tmp_path / "empty").mkdir()
    assert hub.pull("alpha@1", tmp_path / "empty") == tmp_path / "empty"
    # ... but not once the user put a file in it, nor after a listed file was changed
    (pulled / "my_eval.csv").write_text("x")
    with pytest.raises(HubError, match="my_eval.csv"):
        hub.pull("alpha@1", pulled)
    (pulled / "my_eval.csv").unlink()
    (pulled / "README.md").write_text("my own notes about this adapter")
    with pytest.raises(HubError, match="README.md"):
        hub.pull("alpha@1", pulled)
    # asked for explicitly: replaced
    assert main(["hub", "pull", "alpha@1", "--hub", str(tmp_path / "hub"), "--to", str(mine), "--force"]) == 0
    assert not (mine / "notes.txt").exists() and (mine / "mapper.safetensors").is_file()


def test_hf_pull_to_a_folder_follows_the_same_rule(adapters, tmp_path):
    push_to_hf(adapters["alpha"], "lab/alpha-adapter", api=RecordingHfApi(tmp_path / "remote"))
    pull = lambda to, **kw: pull_from_hf("lab/alpha-adapter", cache_dir=tmp_path / "remote",  # noqa: E731
                                         local_files_only=True, to=to, **kw)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(HubError, match=f"{mine}.*not an earlier adapter"):
        pull(mine)
    assert (mine / "notes.txt").read_text() == "mine"
    folder = pull(tmp_path / "copy")
    assert folder == tmp_path / "copy" and (folder / MANIFEST_NAME).is_file()
    assert pull(folder) == folder  # an earlier pull is refreshed
    assert pull(mine, overwrite=True) == mine and not (mine / "notes.txt").exists()


def write_index(hub_root: Path, text: str) -> None:
    (hub_root / INDEX_NAME).write_text(text)


def test_damaged_index_entries_are_refused_by_name(adapters, tmp_path, capsys):
    from prefixvqa.cli import main

    hub = Hub(tmp_path / "hub")
    hub.push(adapters["alpha"], name="alpha")
    hub.push(adapters["beta"], name="beta")
    good = json.loads((tmp_path / "hub" / INDEX_NAME).read_text())
    for damage, expected in ((lambda e: e.pop("base_models"), "base_models.encoder.name"),
                             (lambda e: e["base_models"]["decoder"].pop("name"), "base_models.decoder.name"),
                             (lambda e: e.pop("config"), "'config'"),
                             (lambda e: e["files"]["mapper.safetensors"].pop("sha256"), "mapper.safetensors"),
                             (lambda e: e.update(metrics=[1]), "metrics")):
        index = json.loads(json.dumps(good))
        damage(index["adapters"]["beta"]["1"])
        write_index(tmp_path / "hub", json.dumps(index))
        with pytest.raises(HubError, match=f"entry beta@1: .*{expected}"):
            hub.list()
        for command in ("list", "verify"):
            assert main(["hub", command, "--hub", str(tmp_path / "hub")]) == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and "beta@1" in err and "Traceback" not in err
    for text in ("[]", '{"adapters": {"alpha": []}}', '{"adapters": {"../x": {"1": {}}}}'):
        write_index(tmp_path / "hub", text)
        with pytest.raises(HubError, match="index.json"):
            hub.list()


def test_an_index_with_an_adapter_or_version_twice_is_refused(adapters, tmp_path, capsys):
    from prefixvqa.cli import main

    hub = Hub(tmp_path / "hub")
    hub.push(adapters["alpha"], name="alpha")
    hub.push(adapters["beta"], name="alpha")
    index = json.loads((tmp_path / "hub" / INDEX_NAME).read_text())
    one, two = (json.dumps(index["adapters"]["alpha"][v]) for v in ("1", "2"))
    # two machines' indexes merged as text: the adapter name twice, or one version twice
    merged = {"name": f'{{"adapters": {{"alpha": {{"1": {one}}}, "alpha": {{"2": {two}}}}}}}',
              "version": f'{{"adapters": {{"alpha": {{"1": {one}, "1": {two}}}}}}}'}
    assert json.loads(merged["name"])["adapters"].keys() == {"alpha"}  # what plain json would silently keep
    for kind, expected in (("name", "the adapter 'alpha'"), ("version", "the version alpha@1")):
        write_index(tmp_path / "hub", merged[kind])
        with pytest.raises(HubError, match=f"lists {expected} more than once"):
            hub.index()
        assert main(["hub", "verify", "--hub", str(tmp_path / "hub")]) == 2
        err = capsys.readouterr().err
        assert "more than once" in err and len(err.strip().splitlines()) == 1
        with pytest.raises(HubError, match="more than once"):
            hub.push(adapters["alpha"], name="alpha")  # never written back with one twin dropped


CHILD_PUSH = """
import pathlib, shutil, sys, time
import prefixvqa.hub as hub
real = shutil.copy2
def slow_copy(src, dst, *args, **kwargs):
    result = real(src, dst, *args, **kwargs)
    pathlib.Path(sys.argv[3]).touch()  # the copy has started: the parent may kill now
    time.sleep(120)
    return result
hub.shutil.copy2 = slow_copy
hub.Hub(sys.argv[1]).push(sys.argv[2], name="alpha")
"""


def test_a_push_killed_mid_copy_leaves_nothing_behind(adapters, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import prefixvqa

    root, marker = tmp_path / "hub", tmp_path / "copying"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(prefixvqa.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD_PUSH, str(root), str(adapters["alpha"]), str(marker)],
                             env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the child push never started copying"
            time.sleep(0.05)
        hub = Hub(root)
        assert hub.verify() == []  # a running push holds the lock: its copy is not touched
        assert len(list((root / "alpha").glob(".1.tmp-*"))) == 1
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    leftover = list((root / "alpha").glob(".1.tmp-*"))
    assert len(leftover) == 1 and not (root / INDEX_NAME).exists()  # what the killed push left
    assert hub.push(adapters["alpha"], name="alpha") == "alpha@1"
    assert sorted(p.name for p in (root / "alpha").iterdir()) == ["1"] and hub.verify() == []


def test_verify_finishes_an_overwriting_push_killed_between_its_renames(adapters, tmp_path):
    hub = Hub(tmp_path / "hub")
    hub.push(adapters["alpha"], name="alpha")
    hub.push(adapters["beta"], name="beta")
    folder = tmp_path / "hub" / "alpha" / "1"
    folder.rename(folder.with_name(".1.old-0123abcd"))  # the previous folder, moved aside
    half = folder.with_name(".1.tmp-x7_q2k9a")  # and a new copy that never got its place
    half.mkdir()
    (half / "mapper.safetensors").write_bytes(b"half")
    (tmp_path / "hub" / f".{INDEX_NAME}.0123456789ab.tmp.tmp").write_text("{")  # a killed index write
    (tmp_path / "hub" / "ghost" / ".1.tmp-abc12345").mkdir(parents=True)  # a killed first push of a new name
    assert hub.verify() == []
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == [".index.lock", "alpha", "beta", INDEX_NAME]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["1"]
    assert hub.clean() == []
