"""The command line: help, one-line errors, and answering with a saved adapter."""

import subprocess
import sys

from PIL import Image

from prefixvqa import MedVQAAdapter
from prefixvqa.cli import main
from prefixvqa.config import AdapterConfig
from prefixvqa.testing import TINY_ENCODER


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "prefixvqa.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("train", "cache-features", "answer", "eval", "sweep", "demo"):
        assert command in out.stdout


def test_errors_are_one_line(capsys, tmp_path):
    assert main(["answer", "--adapter", str(tmp_path / "none"), "--image", "x.png", "q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "adapter folder not found" in err


def test_answer_and_choices(tiny_decoders, tmp_path, capsys):
    cfg = AdapterConfig.from_dict({"encoder": TINY_ENCODER, "decoder": {"name": str(tiny_decoders["gpt2"])}})
    folder = MedVQAAdapter(cfg).save_pretrained(tmp_path / "a")
    Image.new("L", (40, 40), 100).save(tmp_path / "x.png")
    assert main(["answer", "--adapter", str(folder), "--image", str(tmp_path / "x.png"), "is it?",
                 "--max-new-tokens", "2"]) == 0
    assert main(["answer", "--adapter", str(folder), "--image", str(tmp_path / "x.png"), "is it?",
                 "--choices", "yes,no"]) == 0
    out = capsys.readouterr().out
    assert "yes" in out and "no" in out
    assert main(["presets"]) == 0 and "demo_smollm2" in capsys.readouterr().out
