"""Data-parallel training: an MDM inside torch.nn.parallel.DistributedDataParallel, unchanged.

    torchrun --nproc_per_node=2 examples/train_ddp.py --steps 500 --out runs/ddp

Each rank draws its own batches (seeded by rank); DDP averages the gradients, so every rank
holds the same weights, EMA and learned Q, D after each step. Rank 0 writes the checkpoint,
which ``fastmdm sample`` / ``fastmdm eval`` read like any other. The same module works inside
Lightning or accelerate: ``MDM.forward(x)`` is the per-sample loss.
"""

import argparse
import os

import torch
import torch.distributed as dist

from fastmdm.data import load_digits
from fastmdm.training import Trainer, build_mdm, checkpoint_path

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--steps", type=int, default=500)
parser.add_argument("--batch-size", type=int, default=64, help="per rank")
parser.add_argument("--out", default="runs/ddp")
args = parser.parse_args()

backend = "nccl" if torch.cuda.is_available() else "gloo"
dist.init_process_group(backend)
rank = dist.get_rank()
device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu")
data = load_digits()
config = {"data": "digits", "diffusion": "learned", "K": 3, "network": "unet", "network_kwargs": {"base": 16},
          "data_shape": data.data_shape, "levels": data.levels, "objective": "dsm", "ema_decay": 0.995}
torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
mdm = build_mdm(config).to(device)
ddp = torch.nn.parallel.DistributedDataParallel(mdm, device_ids=[device] if backend == "nccl" else None)
trainer = Trainer(ddp, lr=2e-3, warmup=100, seed=rank, config=config)
trainer.fit(data.train.to(device), args.steps, args.batch_size)
if rank == 0:
    trainer.save(checkpoint_path(args.out))
    print(f"rank 0: step {trainer.step_count}, last loss {trainer.history['loss'][-1]:.3f}; "
          f"wrote {checkpoint_path(args.out)}")
dist.destroy_process_group()
