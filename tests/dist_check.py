"""Run by test_distributed.py, as one process or under torchrun: one forward/backward of a method
(simclr, byol, barlow, dino with a ResNet or dino_vit) on a fixed global batch of 8 images, each
process taking its share;
rank 0 saves the loss averaged over processes, the gradients after DDP's averaging and the
BatchNorm running statistics. Usage: dist_check.py METHOD OUT.pt"""
import argparse
import importlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
method, out = sys.argv[1], sys.argv[2]
m = importlib.import_module(method.split("_")[0])
rank, _, world_size, device = m.setup_distributed(argparse.Namespace(device="cpu", batch_size=8))
torch.manual_seed(0)
args = argparse.Namespace(arch="vit_tiny" if method == "dino_vit" else "resnet18",
                          patch_size=4 if method == "dino_vit" else None, proj_layers=2,
                          proj_hidden_dim=64, proj_dim=32, pred_hidden_dim=64, drop_path=0.0, grad_checkpointing=False,
                          out_dim=32, head_hidden_dim=64, bottleneck_dim=16, norm_last_layer=True)
name = {"simclr": "SimCLR", "byol": "BYOL", "barlow": "BarlowTwins", "dino": "DINO", "dino_vit": "DINO"}[method]
model = getattr(m, name)(args, 16).double()
extra = {}
ddp = model
if world_size > 1:
    model = m.convert_sync_batchnorm(model, device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
g = torch.Generator().manual_seed(1)
x1, x2 = torch.randn(2, 8, 3, 16, 16, generator=g, dtype=torch.float64)
share = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
x1, x2 = x1[share], x2[share]
if method == "simclr":
    loss = m.info_nce_loss(*ddp(torch.cat([x1, x2])).chunk(2), 0.2)
elif method == "byol":
    p1, p2, z1, z2 = ddp(x1, x2)
    loss = m.byol_loss(p1, z2) + m.byol_loss(p2, z1)
elif method == "barlow":
    loss = m.barlow_twins_loss(*ddp(x1, x2), 0.0051)
else:  # two global crops and two 8 px local crops; the centre starts from a non-zero value
    criterion = m.DINOLoss(32, 4, 0.04, 0.07, 3).double()
    criterion.center.copy_(torch.linspace(-0.1, 0.1, 32))
    local = torch.randn(2, 8, 3, 8, 8, generator=g, dtype=torch.float64)[:, share]
    loss = criterion(*ddp([x1, x2, *local]), epoch=1)
    extra["center"] = criterion.center  # compared with the buffers
loss.backward()
loss = loss.detach()
if world_size > 1:
    dist.all_reduce(loss)
    loss /= world_size
if rank == 0:
    torch.save({"world_size": world_size, "loss": loss,
                "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                "buffers": {**dict(model.named_buffers()), **extra}}, out)
m.cleanup_distributed()  # a process leaving with a live gloo group can abort at exit
