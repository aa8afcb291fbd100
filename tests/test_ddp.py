"""MDM under DistributedDataParallel (gloo, 2 CPU processes): one Trainer step per rank.

Both ranks must end with identical parameters, equal (to float rounding) to one process
taking the same step on the average of the two ranks' losses.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmdm.models import MLPScore
from fastmdm.training import MDM, Trainer, make_diffusion

WORLD = 2
BATCH = 16


def _model() -> MDM:
    torch.manual_seed(0)
    diffusion = make_diffusion("learned", 2)  # learned Q, D (float64) next to float32 network weights
    return MDM(diffusion, MLPScore((2,), 2, hidden=16, layers=2))


def _batch(rank: int) -> torch.Tensor:
    return torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mdm = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(mdm)
        trainer = Trainer(ddp, lr=1e-2, warmup=1, grad_clip=0.5, seed=rank)
        trainer.train_step(_batch(rank))
        torch.save(mdm.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still uses it (a SIGABRT race otherwise)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_step_identical_on_both_ranks_and_equal_to_averaged_loss(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    tensors = [k for k, v in states[0].items() if isinstance(v, torch.Tensor)]
    for key in tensors:
        assert torch.equal(states[0][key], states[1][key]), key

    # single process: same initial weights, each rank's noise stream (Trainer seeds it with seed + 1)
    mdm = _model()
    trainer = Trainer(mdm, lr=1e-2, warmup=1, grad_clip=0.5)
    losses = [mdm(_batch(r), generator=torch.Generator().manual_seed(r + 1)).mean() for r in range(WORLD)]
    trainer.optimizer.zero_grad()
    (sum(losses) / WORLD).backward()
    torch.nn.utils.clip_grad_norm_(mdm.trainable_parameters(), 0.5)
    trainer.optimizer.step()
    changed = 0
    for name, p in mdm.named_parameters():
        torch.testing.assert_close(p.detach(), states[0][name], rtol=1e-5, atol=1e-6)
        changed += not torch.equal(p.detach(), _model().state_dict()[name])
    assert changed == len(list(mdm.parameters()))
