"""Two nodes on one machine, and DeepSpeed ZeRO-2 on CPU: each equals one process.

Two nodes: two `torchrun --nnodes 2` launchers (one process per node, --node_rank 0/1) meet at a rendezvous on the
loopback address, as two machines would at the head node's address (recipes/launch/multinode_torchrun.sh, the SLURM
example beside it). DeepSpeed: ZeRO-2 through accelerate with DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) on
gloo, with recipes/launch/deepspeed_zero2.json. Both reuse the DDP test's script, reference run and tolerance.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from helpers import adapter_tensors, subprocess_env  # noqa: E402
from test_distributed import ROOT, SCRIPT, TORCHRUN, assert_close, single, tensors, work  # noqa: E402,F401

pytestmark = pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_gloo_available(),
                                reason="torchrun with the gloo backend is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(work: Path, out: Path) -> list[subprocess.CompletedProcess]:
    """Node 0 and node 1 as two launchers, each one process, meeting at 127.0.0.1."""
    script = work / "dist_script.py"
    script.write_text(SCRIPT)
    port = free_port()
    procs = [subprocess.Popen([str(TORCHRUN), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
                               "--master_addr=127.0.0.1", f"--master_port={port}", str(script), str(work), str(out),
                               "0", "{}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=subprocess_env()) for rank in (0, 1)]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


@pytest.mark.slow
def test_two_nodes_on_the_loopback_equal_one_process(work, single):
    out = work / "two-nodes"
    nodes = run_two_nodes(work, out)
    for node in nodes:
        assert node.returncode == 0 and "RESULT completed 4" in node.stdout, (node.stdout + node.stderr)[-3000:]
    rank0, rank1 = tensors(out / "rank0.safetensors"), tensors(out / "rank1.safetensors")
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
    assert_close(rank0, tensors(single / "rank0.safetensors"), atol=1e-6)  # the DDP test's tolerance
    assert_close(adapter_tensors(out / "last"), adapter_tensors(single / "last"), atol=1e-6)
    state = json.loads((out / "last" / "trainer_state" / "state.json").read_text())
    assert state["world_size"] == 2 and state["strategy"] == "ddp"


def deepspeed_skip_reason() -> str | None:
    try:
        import deepspeed  # noqa: F401
        from deepspeed.accelerator import get_accelerator
    except ImportError as exc:
        return f"deepspeed not installed ({exc}); pip install 'prefixvqa[deepspeed]'"
    if torch.cuda.is_available():
        return None
    name = get_accelerator().device_name()
    return None if name == "cpu" else f"DeepSpeed's accelerator here is {name!r}, not its CPU accelerator"


@pytest.mark.slow
def test_deepspeed_zero2_on_cpu_equals_one_process(work, single):
    """ZeRO-2 partitions gradients and AdamW states over the two ranks; the weights must still be one process's."""
    reason = deepspeed_skip_reason()
    if reason:
        pytest.skip(reason)
    script = work / "dist_script.py"
    script.write_text(SCRIPT)
    out = work / "zero2"
    extra = {"distributed": "deepspeed", "deepspeed_config": str(ROOT / "recipes" / "launch" / "deepspeed_zero2.json")}
    run = subprocess.run([str(TORCHRUN), "--nproc_per_node=2", f"--master_port={free_port()}", str(script), str(work),
                          str(out), "0", json.dumps(extra)], capture_output=True, text=True, timeout=300,
                         env=subprocess_env(DS_ACCELERATOR="cpu"))
    assert run.returncode == 0 and "RESULT completed 4" in run.stdout, (run.stdout + run.stderr)[-3000:]
    rank0, rank1 = tensors(out / "rank0.safetensors"), tensors(out / "rank1.safetensors")
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
    assert_close(rank0, tensors(single / "rank0.safetensors"), atol=1e-6)  # the DDP test's tolerance (5e-8 here)
    assert_close(adapter_tensors(out / "last"), adapter_tensors(single / "last"), atol=1e-6)
    assert json.loads((out / "last" / "trainer_state" / "state.json").read_text())["strategy"] == "zero2"


def test_multinode_launch_files_parse_and_launch_one_torchrun_per_node():
    """recipes/launch/: the torchrun script and the SLURM batch file are valid bash, start one torchrun per node with
    the rendezvous flags the two-node test uses, and the script refuses to start without its node rank."""
    import re

    launch = ROOT / "recipes" / "launch"
    for name in ("multinode_torchrun.sh", "multinode_slurm.sbatch"):
        assert subprocess.run(["bash", "-n", str(launch / name)]).returncode == 0, name
        text = (launch / name).read_text()
        flags = set(re.findall(r"--(nnodes|nproc_per_node|node_rank|master_addr|master_port)\b", text))
        assert flags == {"nnodes", "nproc_per_node", "node_rank", "master_addr", "master_port"}, name
        assert "-m prefixvqa.cli train" in text
    sbatch = (launch / "multinode_slurm.sbatch").read_text()
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch
    assert '--node_rank "$SLURM_NODEID"' in sbatch
    env = {k: v for k, v in subprocess_env().items() if k not in ("NODE_RANK", "MASTER_ADDR")}
    run = subprocess.run(["bash", str(launch / "multinode_torchrun.sh"), "r.yaml"], capture_output=True, text=True,
                         env=env)
    assert run.returncode != 0 and "NODE_RANK" in run.stderr
    readme = (ROOT / "recipes" / "README.md").read_text()
    assert "multinode_torchrun.sh" in readme and "multinode_slurm.sbatch" in readme
