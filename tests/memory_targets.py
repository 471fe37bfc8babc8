"""Targets for the subprocess memory measurements of the tests (see
flashloss.benchmark.memory for the protocol: build inputs, return run())."""
import torch


def linear_alloc(n: int):
    x = torch.randn(n, 64)

    def run():
        return (x * 2).sum(1)  # O(n) temporaries

    return run


def quadratic_alloc(n: int):
    """A planted defect: materialises an n x n matrix (what flashloss must never do)."""
    x = torch.randn(n, 64)

    def run():
        return (x @ x.T).logsumexp(1)

    return run


def row_logsumexp_fwd_bwd(n: int, v: int, backend: str):
    import flashloss

    x = torch.randn(n, v, requires_grad=True)
    g = torch.randn(n)

    def run():
        if backend == "naive":
            out = flashloss.ref.row_logsumexp(x)
        else:
            out = flashloss.row_logsumexp(x, backend=backend)
        (gx,) = torch.autograd.grad(out, x, g)
        return gx

    return run


def clip_fwd_bwd(n: int, backend: str, d: int = 64):
    import torch.nn.functional as F

    import flashloss

    img = F.normalize(torch.randn(n, d), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(n, d), dim=-1).requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)

    def run():
        if backend == "naive":
            logits = scale * img @ txt.T
            labels = torch.arange(n)
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        else:
            loss = flashloss.clip_loss(img, txt, scale, backend=backend)
        return torch.autograd.grad(loss, (img, txt, scale))

    return run


def distill_clip_fwd_bwd(n: int, backend: str, d: int = 64, d_teacher: int = 96):
    """open_clip DistillClipLoss forward+backward: flashloss, or open_clip's dense module."""
    import torch.nn.functional as F

    import flashloss

    img = F.normalize(torch.randn(n, d), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(n, d), dim=-1).requires_grad_(True)
    t_img = F.normalize(torch.randn(n, d_teacher), dim=-1)
    t_txt = F.normalize(torch.randn(n, d_teacher), dim=-1)
    scale = torch.tensor(10.0, requires_grad=True)
    if backend == "naive":
        from flashloss.benchmark.anchors import open_clip_loss_module

        module = open_clip_loss_module().DistillClipLoss()
    else:
        module = flashloss.DistillClipLoss(backend=backend)

    def run():
        c, dl = module(img, txt, scale, t_img, t_txt, torch.tensor(20.0))
        return torch.autograd.grad(c + dl, (img, txt, scale))

    return run


def token_logprobs_fwd_bwd(n: int, h: int, v: int, backend: str = "auto"):
    import flashloss

    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) / h ** 0.5).requires_grad_(True)
    t = torch.randint(0, v, (n,))
    g = torch.randn(n)

    def run():
        if backend == "naive":
            logp = flashloss.ref.token_logprobs(hidden, weight, t)["logp"]
        else:
            logp = flashloss.ops.token_logprobs(hidden, weight, t, backend=backend).logp
        return torch.autograd.grad(logp, (hidden, weight), g)

    return run
