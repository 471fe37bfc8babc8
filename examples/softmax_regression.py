"""Softmax regression on synthetic data with flashloss.row_logsumexp as the cross-entropy's
normaliser: loss_i = LSE_j(z_ij) - z_{i,y_i}. Runs on the CPU in seconds and prints the loss
falling. Usage: python examples/softmax_regression.py [--steps 200] [--backend auto]."""
import argparse

import torch

import flashloss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(args.classes, args.dim, generator=gen)  # the labels come from this
    weight = torch.zeros(args.classes, args.dim, requires_grad=True)
    opt = torch.optim.Adam([weight], lr=0.05)
    first = last = None
    for step in range(args.steps):
        x = torch.randn(args.batch, args.dim, generator=gen)
        y = (x @ teacher.T).argmax(dim=1)
        logits = x @ weight.T
        lse = flashloss.row_logsumexp(logits, backend=args.backend)
        loss = (lse - logits.gather(1, y[:, None]).squeeze(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {last:.4f}")
    print(f"loss fell from {first:.4f} to {last:.4f}")


if __name__ == "__main__":
    main()
