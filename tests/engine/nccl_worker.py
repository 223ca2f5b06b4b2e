"""One torchrun rank (``--nproc_per_node 1``) that trains a tiny MedFlowSeg a few steps on its
GPU through DistributedDataParallel over NCCL, under bf16 autocast, and then the same steps
without DDP in the same process; writes both networks' largest weight difference, the loss
terms of each step and the process group's backend to the JSON file it is given.

A single rank is the only NCCL case one GPU can run (NCCL refuses two ranks on one device),
and ``medflow train`` joins no group for one rank (``Ranks.active``); so this worker joins
the group itself, as a user's script would, and trains through the method's own loss, the
loss mean over ranks and the broadcast ``medflow.engine.distributed`` provides.

    python -m torch.distributed.run --standalone --nproc_per_node 1 nccl_worker.py OUT.json
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from medflow.engine import runtime
from medflow.engine.distributed import Ranks, backend_for, from_main, mean_over_ranks
from medflow.models.unet import SegNet
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.methods import TrainBatch, method_for

STEPS = 3
BATCH, SIZE, CLASSES = 4, 16, 3


def _train(model: torch.nn.Module, net: SegNet, device: torch.device) -> list[list[float]]:
    """``STEPS`` SGD steps of the default method's loss on fixed data; the loss terms."""
    method = method_for(TrainConfig(channels=(8, 16)))
    gen = torch.Generator().manual_seed(0)  # data, noise and times: the same for both runs
    images = torch.randn(BATCH, 1, SIZE, SIZE, generator=gen).to(device)
    masks = torch.randint(CLASSES, (BATCH, SIZE, SIZE), generator=gen).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    terms_seen = []
    for _ in range(STEPS):
        with runtime.autocast(device):
            terms = method.loss(TrainBatch(images, masks, model, net, gen, slice(0, BATCH)))
        terms_seen.append(mean_over_ranks(terms.parts()).tolist())
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        opt.step()
    return terms_seen


def main(out: Path) -> None:
    ranks = Ranks.from_env()
    device = torch.device("cuda", ranks.local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), device_id=device)
    try:
        torch.manual_seed(0)
        cfg = method_for(TrainConfig(channels=(8, 16))).net_config(1, CLASSES)
        ddp_net, plain = SegNet(cfg).to(device), SegNet(cfg).to(device)
        plain.load_state_dict(ddp_net.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(ddp_net, device_ids=[device.index])
        ddp_terms = _train(ddp, ddp_net, device)
        plain_terms = _train(plain, plain, device)
        diff = max(
            (a - b).abs().max().item()
            for a, b in zip(ddp_net.state_dict().values(), plain.state_dict().values())
        )
        result = {
            "backend": dist.get_backend(),
            "world": dist.get_world_size(),
            "broadcast": from_main({"rank": ranks.rank}),
            "ddp_terms": ddp_terms,
            "plain_terms": plain_terms,
            "max_weight_diff": diff,
            "grad_dtypes": sorted({str(p.grad.dtype) for p in ddp_net.parameters()}),
        }
        if ranks.main:
            out.write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
