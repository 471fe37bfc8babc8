"""CLIP-style contrastive training on synthetic paired data at a batch size whose N x N similarity
matrix (and the naive loss's copies of it) would not fit the memory you give it.

Two small linear "towers" map noisy views of shared latent vectors to embeddings; the symmetric
CLIP loss with a learnable logit scale pulls matching pairs together. flashloss.clip_loss keeps
O(N) statistics and recomputes similarity tiles in backward, so the loss's extra memory stays in
the tens of MB while the naive loss would need ~5 N^2 * 4 bytes (about 20 GB at N = 32768).

Usage: python examples/clip_large_batch.py [--batch 32768] [--steps 10] [--dim 128]
"""
import argparse
import resource
import time

import torch
import torch.nn.functional as F

import flashloss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    n = args.batch
    naive_gb = 5 * n * n * 4 / 2**30
    print(f"batch {n}: the similarity matrix alone is {n * n * 4 / 2**30:.1f} GiB in fp32; "
          f"the naive loss peaks near {naive_gb:.1f} GiB")
    gen = torch.Generator().manual_seed(0)
    mix_a = torch.randn(args.latent, 64, generator=gen)
    mix_b = torch.randn(args.latent, 64, generator=gen)
    image_tower = torch.nn.Linear(64, args.dim)
    text_tower = torch.nn.Linear(64, args.dim)
    logit_scale = torch.nn.Parameter(torch.tensor(2.659))  # log(1/0.07), as open_clip
    params = list(image_tower.parameters()) + list(text_tower.parameters()) + [logit_scale]
    opt = torch.optim.Adam(params, lr=3e-3)
    first = None
    for step in range(args.steps):
        z = torch.randn(n, args.latent, generator=gen)
        x_img = z @ mix_a + 0.5 * torch.randn(n, 64, generator=gen)
        x_txt = z @ mix_b + 0.5 * torch.randn(n, 64, generator=gen)
        t0 = time.perf_counter()
        img = F.normalize(image_tower(x_img), dim=-1)
        txt = F.normalize(text_tower(x_txt), dim=-1)
        loss = flashloss.clip_loss(img, txt, logit_scale.exp(), backend=args.backend)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            logit_scale.clamp_(max=4.6052)  # open_clip clamps the scale at 100
        first = loss.item() if first is None else first
        print(f"step {step:3d}  loss {loss.item():.4f}  scale {logit_scale.exp().item():6.2f}  "
              f"{time.perf_counter() - t0:.2f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"loss fell from {first:.4f} to {loss.item():.4f}; process peak RSS {peak:.2f} GiB "
          f"(naive loss alone: ~{naive_gb:.1f} GiB)")


if __name__ == "__main__":
    main()
