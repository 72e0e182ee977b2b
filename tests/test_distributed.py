"""Synchronised γ-Lipschitz BatchNorm: 2 gloo processes with half batches each must match one process
with the whole batch (outputs, input gradients, parameter gradients, running statistics)."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lcnn_zoo import LipschitzBatchNorm2d
from lcnn_zoo.layers import sync_batchnorm


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
