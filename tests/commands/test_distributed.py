"""Distributed training: synchronised γ-Lipschitz BatchNorm (2 gloo processes with half batches each
match one process with the whole batch: outputs, input gradients, parameter gradients, running
statistics), and a stopped rank makes the other fail within the collective timeout."""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lcnn_zoo import LipschitzBatchNorm2d
from lcnn_zoo.layers import sync_batchnorm

from cli_helpers import FAST_LCNN_RUN, needs_fmnist

REPO = Path(__file__).resolve().parents[2]


def make():
    torch.manual_seed(0)
    bn = LipschitzBatchNorm2d(3, affine=True, gamma_init=2.0).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 0.7], dtype=torch.float64))
    return bn


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64) * 3 + 1


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    bn = sync_batchnorm(make())
    x = data()[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    y = bn(x)
    (g,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)  # double backward through the sync
    g.pow(2).sum().backward()
    torch.save({"y": y.detach(), "x_grad": x.grad, "w_grad": bn.weight.grad, "rv": bn.running_var.clone()},
               os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_synced_lbn_matches_single_process():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        parts = [torch.load(os.path.join(d, f"{r}.pt")) for r in range(2)]
    bn = make()
    x = data().requires_grad_(True)
    y = bn(x)
    (g,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
    g.pow(2).sum().backward()
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach())
    torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]), x.grad)
    torch.testing.assert_close(parts[0]["w_grad"] + parts[1]["w_grad"], bn.weight.grad)  # DDP would sum/average
    torch.testing.assert_close(parts[0]["rv"], bn.running_var)


@pytest.mark.slow
@needs_fmnist
def test_a_stopped_rank_makes_the_other_fail_within_the_timeout(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "-m",
           "lcnn_zoo", "train"] + FAST_LCNN_RUN + ["--epochs", "50", "--threads", "1", "--output", str(tmp_path),
                                        "--experiment", "stop", "--dist-timeout", "20"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 240
    victim = None
    while victim is None and time.time() < deadline:  # the rank-1 worker, once training started
        time.sleep(1)
        out = subprocess.run(["pgrep", "-f", "-n", "lcnn_zoo train.*--experiment stop"], capture_output=True, text=True)
        ckpt_started = (tmp_path / "stop" / "args.json").exists()
        if out.stdout.strip() and ckpt_started:
            victim = int(out.stdout.split()[0])
    assert victim is not None
    os.kill(victim, signal.SIGSTOP)
    try:
        t = time.time()
        proc.wait(timeout=240)
        assert proc.returncode != 0 and time.time() - t < 200
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the stopped rank, if the launcher left it
        except ProcessLookupError:
            pass
