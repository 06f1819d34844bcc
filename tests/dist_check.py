"""Run by test_distributed.py, as one process or under torchrun: one SimCLR forward/backward on a
fixed global batch of 8 images (each process takes its share); rank 0 saves the loss averaged
over processes, the gradients after DDP's averaging and the BatchNorm running statistics."""
import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import simclr  # noqa: E402

rank, _, world_size, device = simclr.setup_distributed(argparse.Namespace(device="cpu", batch_size=8))
torch.manual_seed(0)
model = simclr.SimCLR(argparse.Namespace(arch="resnet18", proj_layers=2, proj_hidden_dim=64, proj_dim=32), cifar_stem=True)
model = model.double()
ddp = model
if world_size > 1:
    model = simclr.convert_sync_batchnorm(model, device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
g = torch.Generator().manual_seed(1)
x1, x2 = torch.randn(2, 8, 3, 16, 16, generator=g, dtype=torch.float64)
share = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
z = ddp(torch.cat([x1[share], x2[share]]))
loss = simclr.info_nce_loss(*z.chunk(2), 0.2)
loss.backward()
loss = loss.detach()
if world_size > 1:
    dist.all_reduce(loss)
    loss /= world_size
if rank == 0:
    torch.save({"loss": loss, "grads": {n: p.grad for n, p in model.named_parameters()},
                "buffers": {n: b for n, b in model.named_buffers()}}, sys.argv[1])
simclr.cleanup_distributed()  # a process leaving with a live gloo group can abort at exit
