"""CLIP-style contrastive training across processes with flashloss.distributed, on synthetic data.

Each rank draws its own batch of paired "image" and "text" inputs (noisy views of shared latent
vectors), embeds them with two small linear towers wrapped in DistributedDataParallel, and computes
the symmetric CLIP loss of its rows against the texts of every rank. With impl="ring" the text
blocks travel around the ring of ranks (point-to-point sends overlapped with the blockwise loss),
so no rank ever holds the global batch or a similarity matrix; DDP's gradient averaging then gives
exactly the gradient of the single-process loss on the concatenated batch.

Usage (CPU, gloo):   torchrun --nproc_per_node 2 examples/clip_distributed.py [--steps 30]
On GPUs (NCCL):      torchrun --nproc_per_node 8 examples/clip_distributed.py --device cuda
Options: --batch (rows per rank), --impl ring|bidir|gather, --loss clip|siglip, --dim, --steps.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import flashloss.distributed as fd


class Towers(torch.nn.Module):
    def __init__(self, dim: int, loss: str):
        super().__init__()
        self.image = torch.nn.Linear(64, dim)
        self.text = torch.nn.Linear(64, dim)
        # open_clip's inits: scale exp(2.659) = 1/0.07 for CLIP; SigLIP's scale 10 and bias -10
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.659 if loss == "clip" else 2.303))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0)) if loss == "siglip" else None

    def forward(self, x_img, x_txt):
        return (F.normalize(self.image(x_img), dim=-1), F.normalize(self.text(x_txt), dim=-1),
                self.logit_scale.exp(), self.logit_bias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024, help="rows per rank")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--impl", default="ring", choices=fd.IMPLS)
    parser.add_argument("--loss", default="clip", choices=("clip", "siglip"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts it)
    model = Towers(args.dim, args.loss).to(device)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=3e-3)
    # shared "world": the mixing matrices are the same on every rank, the samples are not
    mix = torch.Generator().manual_seed(1)
    mix_a, mix_b = torch.randn(args.latent, 64, generator=mix), torch.randn(args.latent, 64, generator=mix)
    data = torch.Generator().manual_seed(100 + rank)
    loss_fn = fd.clip_loss if args.loss == "clip" else fd.siglip_loss
    if rank == 0:
        print(f"{world} ranks x {args.batch} rows = global batch {world * args.batch}; loss {args.loss}, "
              f"impl {args.impl}, backend {dist.get_backend()}")
    first = None
    for step in range(args.steps):
        z = torch.randn(args.batch, args.latent, generator=data)
        x_img = (z @ mix_a + 0.5 * torch.randn(args.batch, 64, generator=data)).to(device)
        x_txt = (z @ mix_b + 0.5 * torch.randn(args.batch, 64, generator=data)).to(device)
        t0 = time.perf_counter()
        img, txt, scale, bias = ddp(x_img, x_txt)
        # each rank's value is W x its share of the global loss; their average is the global loss
        loss = loss_fn(img, txt, scale, bias, impl=args.impl)
        opt.zero_grad()
        loss.backward()  # collective: the text gradients travel back to their ranks; DDP averages
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=4.6052)  # open_clip clamps the scale at 100
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        global_loss = global_loss.item() / world
        first = global_loss if first is None else first
        if rank == 0:
            print(f"step {step:3d}  loss {global_loss:.4f}  scale {model.logit_scale.exp().item():6.2f}  "
                  f"{time.perf_counter() - t0:.2f} s")
    if rank == 0:
        print(f"loss fell from {first:.4f} to {global_loss:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
