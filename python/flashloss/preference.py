"""Preference objectives (OBJECTIVES.md §3) on per-sequence log-probs.

Every function here works on small per-sequence vectors ([B], or [L, K] for lists) that primitive B
(`flashloss.ops.sequence_logprobs`, or the fused module built on it) has already produced, so this
layer is plain PyTorch (primitive D of OBJECTIVES.md §0.5): thin, readable, differentiable by
autograd. Each docstring states its formula.

Conventions shared by every function:
- Log-probs are per-sequence **sums** over completion tokens unless a function says otherwise;
  `*_lengths` are completion token counts (clamped to >= 1) for the losses that average.
- Reference log-probs are constants: they are detached (OBJECTIVES.md: "no grad"). `None` means
  reference-free (a reference of 0).
- beta is a float > 0 or a tensor (0-d, or one value per pair/example; tensor values are not
  checked, they must be > 0). Gradients flow to every policy input (and to a beta tensor that
  requires grad).
- Arithmetic runs in float32 (float64 when an input is float64); the loss comes back in that dtype.
- `reduction`: 'none' gives one loss per item (pair, example, list), 'sum' their sum, 'mean' their
  mean. Batch-level scalar terms (an NLL given as one number) are broadcast to every item, so 'mean'
  adds them once and 'sum' B times; 'mean' of 'none' always equals 'mean'.
- Every function returns `(loss, metrics)`; `metrics` is a dict of detached 0-d tensors (means over
  the batch), under TRL's names where TRL logs the quantity.
- `backend` is accepted for the uniform API (DESIGN.md §4); this layer has nothing to dispatch.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ._backend import _check_name
from ._validate import same_device, check_reduction
from .ops.contrastive_lse import softplus

__all__ = [
    "LOSS_TYPES", "F_DIVERGENCE_TYPES", "F_DIVERGENCE_LOSS_TYPES", "RunningMean",
    "preference_loss", "dpo_loss", "ipo_loss", "simpo_loss", "cpo_loss", "alphapo_loss", "orpo_loss",
    "kto_loss", "bco_loss", "udm_weight", "npo_loss", "tdpo_loss", "lipo_lambda_loss", "plackett_luce_loss",
    "bradley_terry_loss",
]

CONVENTIONS = ("trl", "trl_legacy")

# DPO-family loss types (OBJECTIVES.md §3.2): TRL 1.x names plus `cdpo`.
LOSS_TYPES = ("sigmoid", "cdpo", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
LOSS_TYPE_ALIASES = {"aot_pair": "aot_unpaired"}  # TRL v0.24.0 name
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL 1.x allows a non-default f-divergence only with these (the f-DPO reparameterisation leaves a
# log-partition term that cancels only in the chosen-rejected difference); `cdpo` is sigmoid with smoothing.
F_DIVERGENCE_LOSS_TYPES = frozenset({"sigmoid", "cdpo", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                                     "discopop", "sft"})
# losses that are a function of the pair logit h = beta * (s_w - s_l): the DPOP / R-DPO modifiers act on h
_PAIR_LOGIT_TYPES = frozenset({"sigmoid", "cdpo", "hinge", "robust", "exo_pair", "discopop"})
_SORTING_TYPES = frozenset({"aot", "aot_unpaired"})
_LENGTH_TYPES = frozenset({"ipo", "sigmoid_norm"})
EXP_CLAMP = 80.0  # exp of an unbounded argument: argument clamped to <= 80 (OBJECTIVES.md §0.2)


# ---------------------------------------------------------------------------------------------
# helpers


def _logsigmoid(x: torch.Tensor) -> torch.Tensor:
    """log sigma(x) = -softplus(-x), exact for every x."""
    return -softplus(-x)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0 (switch at -ln 2, OBJECTIVES.md §0.2)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _check_backend(backend: str) -> None:
    # the losses here act on [B] tensors; `backend` is accepted for the common signature and checked
    _check_name(backend, "backend")


def _acc_dtype(*ts) -> torch.dtype:
    return torch.float64 if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in ts) \
        else torch.float32


def _tensor(name: str, x, dims: tuple[int, ...], shape=None, like: str = "", floating: bool = True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {list(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}{' like ' + like if like else ''}, got {list(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _vec(name: str, x, n: Optional[int], dt: torch.dtype, like: str = "policy_chosen") -> torch.Tensor:
    """A [B] float tensor in the arithmetic dtype."""
    _tensor(name, x, (1,), None if n is None else (n,), like)
    return x.to(dt)


def _ref(name: str, x, n: int, dt: torch.dtype, device, like: str = "policy_chosen") -> torch.Tensor:
    if x is None:
        return torch.zeros(n, dtype=dt, device=device)
    return _vec(name, x, n, dt, like).detach()


def _refs(rc, rr, n, dt, device, names=("ref_chosen", "ref_rejected")):
    if (rc is None) != (rr is None):
        raise ValueError(f"give both {names[0]} and {names[1]}, or neither (reference-free)")
    return _ref(names[0], rc, n, dt, device), _ref(names[1], rr, n, dt, device)


def _lengths(name: str, x, n: int, dt: torch.dtype, like: str = "policy_chosen"):
    """Completion lengths [B] (any numeric dtype) as floats, clamped to >= 1; None stays None."""
    if x is None:
        return None
    _tensor(name, x, (1,), (n,), like, floating=False)
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must hold token counts (integer or float), got {x.dtype}")
    return x.detach().to(dt).clamp_min(1.0)


def _beta(beta, n: int, dt: torch.dtype, name: str = "beta", like: str = "policy_chosen"):
    """beta as a python float (> 0) or a tensor broadcastable against [n]."""
    if isinstance(beta, torch.Tensor):
        if not beta.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating-point tensor, got {beta.dtype}")
        if beta.dim() == 0:
            return beta.to(dt)
        if beta.dim() != 1 or beta.shape[0] != n:
            raise ValueError(f"{name} must be a float, a 0-d tensor or a per-item [B={n}] tensor like {like}, "
                             f"got shape {list(beta.shape)}")
        return beta.to(dt)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(beta).__name__}")
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"{name} must be > 0 and finite, got {beta}")
    return float(beta)


def _is_tensor_beta(beta) -> bool:
    return isinstance(beta, torch.Tensor) and beta.dim() > 0


def _float_arg(name: str, x, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    x = float(x)
    bad = not math.isfinite(x)
    if lo is not None:
        bad |= x <= lo if lo_open else x < lo
    if hi is not None:
        bad |= x >= hi if hi_open else x > hi
    if bad:
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}" \
              f"{')' if hi_open or hi is None else ']'}"
        raise ValueError(f"{name} must be in {rng}, got {x}")
    return x


def _scalar_or_vec(name: str, x, n: int, dt: torch.dtype, device, like: str = "policy_chosen") -> torch.Tensor:
    """A batch-level term (e.g. an NLL) given as a float, a 0-d tensor or per item [B]; returned as [B]."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return torch.full((n,), float(x), dtype=dt, device=device)
    _tensor(name, x, (0, 1), like=like)
    if x.dim() == 1 and x.shape[0] != n:
        raise ValueError(f"{name} must be a 0-d tensor or have shape [B={n}] like {like}, got {list(x.shape)}")
    return x.to(dt).expand(n)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dt) -> torch.Tensor:
    """Mean of x over mask, 0 for an empty mask. Eager: x[mask].mean(); inside torch.compile the
    same value as a masked sum / count (no data-dependent shape)."""
    if torch.compiler.is_compiling():
        return torch.where(mask, x, 0.0).sum() / mask.sum().clamp_min(1).to(dt)
    return x[mask].mean() if bool(mask.any()) else torch.zeros((), dtype=dt, device=x.device)


def _reduce(per_item: torch.Tensor, reduction: str, nan: bool = False) -> torch.Tensor:
    if reduction == "none":
        return per_item
    if reduction == "sum":
        return per_item.nansum() if nan else per_item.sum()
    if per_item.numel() == 0:
        return per_item.sum()  # 0, not NaN
    return per_item.nanmean() if nan else per_item.mean()


def _smoothed_sigmoid(h: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigma(h) - eps log sigma(-h) (cDPO / conservative form)."""
    loss = -_logsigmoid(h)
    if eps:
        loss = (1.0 - eps) * loss - eps * _logsigmoid(-h)
    return loss


def _pair_metrics(beta, r_w, r_l, logp_w, logp_l, dt) -> dict:
    """TRL's reward metrics (OBJECTIVES.md §3.9): rewards beta*r, strict accuracy, margins, mean log-probs."""
    with torch.no_grad():
        cw = (beta * r_w).detach()
        cl = (beta * r_l).detach()
        return {
            "rewards/chosen": cw.mean(),
            "rewards/rejected": cl.mean(),
            "rewards/accuracies": (cw > cl).to(dt).mean(),
            "rewards/margins": (cw - cl).mean(),
            "logps/chosen": logp_w.detach().mean(),
            "logps/rejected": logp_l.detach().mean(),
        }


class RunningMean:
    """Running mean of a stream of values: the delta of BCO (OBJECTIVES.md §3.2 legacy `bco_pair`,
    §3.5 `bco_loss`). Same update as TRL's `RunningMoments` mean: the count starts at 1e-24, so the
    first update sets the mean to that batch's mean; `update(values)` then moves the mean by
    (mean(values) - mean) * n / (count + n) with n = values.numel() (each value is one sample).
    In multi-process training pass the values gathered over all ranks, so that every rank holds
    the same state. Keep one instance per training run (checkpoint it with state_dict()).
    """

    def __init__(self, mean: float = 0.0, count: float = 1e-24):
        self.mean = float(mean)
        self.count = float(count)

    def update(self, values) -> float:
        """Adds `values` (any shape; detached) to the stream; returns their mean."""
        v = torch.as_tensor(values).detach().to(torch.float64)
        n = v.numel()
        if n == 0:
            return float("nan")
        m = float(v.mean())
        total = self.count + n
        self.mean += (m - self.mean) * n / total
        self.count = total
        return m

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean = float(state["mean"])
        self.count = float(state["count"])

    def __repr__(self) -> str:
        return f"RunningMean(mean={self.mean!r}, count={self.count!r})"


# ---------------------------------------------------------------------------------------------
# 3.1 f-divergence scores


def _f_scores(r: torch.Tensor, kind: str, alpha: float, cap: float) -> torch.Tensor:
    """s = g(r) of OBJECTIVES.md §3.1 (exp arguments clamped to <= cap)."""
    if kind == "reverse_kl":
        return r
    if kind == "forward_kl":  # 1 - e^{-r}
        return -torch.expm1((-r).clamp_max(cap))
    if kind == "js_divergence":  # ln 2 + log sigma(r)
        return math.log(2.0) + _logsigmoid(r)
    # alpha_divergence: (e^{(alpha-1) r} - 1) / (alpha - 1); the limit alpha -> 1 is r
    if abs(alpha - 1.0) < 1e-6:
        return r
    return torch.expm1(((alpha - 1.0) * r).clamp_max(cap)) / (alpha - 1.0)


# ---------------------------------------------------------------------------------------------
# 3.2-3.3 the DPO family


def _loss_types(loss_type) -> list[str]:
    names = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(names, (list, tuple)) or len(names) == 0:
        raise ValueError(f"loss_type must be a loss name or a non-empty list of names, got {loss_type!r}")
    out = []
    for name in names:
        canon = LOSS_TYPE_ALIASES.get(name, name) if isinstance(name, str) else name
        if canon not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {name!r}; valid loss types are {list(LOSS_TYPES)} "
                             f"(aliases: {LOSS_TYPE_ALIASES})")
        out.append(canon)
    return out


@same_device
def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: Optional[torch.Tensor] = None,
    ref_rejected: Optional[torch.Tensor] = None,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    beta=0.1,
    *,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    convention: str = "trl",
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    loss_weights: Optional[Sequence[float]] = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: Optional[float] = None,
    discopop_tau: float = 0.05,
    chosen_nll: Optional[torch.Tensor] = None,
    rpo_alpha: Optional[float] = None,
    wpo_weights: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    dpop_lambda: Optional[float] = None,
    rdpo_alpha: Optional[float] = None,
    bco_state: Optional[RunningMean] = None,
    update_bco_state: bool = True,
    backend: str = "auto",
):
    """DPO-family preference losses on per-sequence log-probs (OBJECTIVES.md §3.1-3.3), numbers as
    huggingface/trl `DPOTrainer` (`convention="trl"`: TRL 1.x; `"trl_legacy"`: TRL v0.24.0).

    Inputs per pair b: policy log-probs l_w = policy_chosen[b], l_l = policy_rejected[b] (summed over
    completion tokens, with grad), reference l^r_w, l^r_l (detached; None = reference-free = 0),
    completion lengths n_w, n_l (clamped >= 1; needed by ipo, sigmoid_norm, R-DPO, the legacy ipo
    averaging and the derived sft NLL). r = l - l^r, eps = label_smoothing.

    Scores (§3.1): s = g(r) with `f_divergence_type` reverse_kl (g(r) = r, default), forward_kl
    (1 - e^{-r}), js_divergence (ln 2 + log sigma(r)) or alpha_divergence ((e^{(a-1)r} - 1)/(a-1),
    a = `f_alpha_divergence_coef`, default 0.5; the argument of exp clamped to <= 80, so scores stay
    below e^80 ~ 5.5e34: the square in ipo can still overflow float32 for huge log-ratios). Pair logit
    h = beta (s_w - s_l). Under "trl" a non-default divergence is only allowed with the loss types
    in F_DIVERGENCE_LOSS_TYPES (ValueError otherwise, as TRL). Under "trl_legacy",
    `f_alpha_divergence_coef` is TRL v0.24.0's a' (default 1.0; the same scores with a = 1 - a'; the
    exp argument is clamped to <= 80 here too, where v0.24.0's `cap_exp` allowed log(finfo.max),
    ~88.72 in fp32, whose later products overflow), forward_kl does not exist (it is a' = 1), and
    the losses that TRL v0.24.0 did not route through the f-score (nca_pair, bco_pair, sppo_hard,
    aot*, apo*, discopop) silently use raw log-ratios, as there.

    Per-pair losses (TRL 1.x), `loss_type` a name or a list of names:
      sigmoid       -log sigma(h)                         (legacy: the cdpo form below)
      cdpo          -(1 - eps) log sigma(h) - eps log sigma(-h)          (flashloss; any convention)
      hinge         max(0, 1 - h)
      ipo           (s_w/n_w - s_l/n_l - 1/(2 beta))^2    (legacy: every log-prob, policy and
                    reference, is divided by its length before anything else whenever "ipo" is
                    in the list, for every loss and for the metrics, then (D - 1/(2 beta))^2)
      exo_pair      sigma(h)[log sigma(h) - log(1-eps)] + sigma(-h)[log sigma(-h) - log eps];
                    eps > 0 required (legacy: eps = 0 is replaced by 1e-3)
      nca_pair      -log sigma(beta r_w) - 1/2 log sigma(-beta r_w) - 1/2 log sigma(-beta r_l)
      robust        [-(1-eps) log sigma(h) + eps log sigma(-h)] / (1 - 2 eps), eps in [0, 0.5)
      bco_pair      -log sigma(beta r_w) - log sigma(-beta r_l)
                    (legacy: -log sigma(beta r_w - d) - log sigma(-(beta r_l - d)) with d the
                    running mean of per-call batch means of all 2B rewards beta r, kept in
                    `bco_state` (a RunningMean; updated before use when `update_bco_state`, as
                    TRL v0.24.0 did in training and evaluation alike). Without a state d is the
                    current batch mean (a fresh state).)
      sppo_hard     (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2
      aot           d_k = sort(l_w - l_l)_k - sort(l^r_w - l^r_l)_k (ascending over the batch),
                    -(1-eps) log sigma(beta d_k) - eps log sigma(-beta d_k); 'none' gives the loss per
                    sorted position k, not per pair. beta must be a scalar.
      aot_unpaired  the same with d_k = sort(r_w)_k - sort(r_l)_k  (alias: aot_pair)
      apo_zero      1 - sigma(beta r_w) + sigma(beta r_l)
      apo_down      sigma(beta r_w) + 1 - sigma(beta (r_w - r_l))
      discopop      rho = h (legacy: beta (r_w - r_l), no f-score), tau = `discopop_tau`:
                    (1 - sigma(rho/tau)) (-log sigma(rho)) + exp(log sigma(rho/tau) - rho)
                    (the stable form of sigma(rho/tau) e^{-rho}; the modulation is not detached)
      sft           the token-mean NLL of the chosen completions of the batch, the same for
                    every pair: `chosen_nll` if given (0-d or [B]), else
                    -sum_b l_w / sum_b n_w (needs chosen_lengths; sums as given, before any
                    legacy ipo averaging)
      sigmoid_norm  -log sigma(beta (s_w/n_w - s_l/n_l))
    Total per pair: sum_k loss_weights[k] * loss_k (weights default 1), then the modifiers:
      rpo_alpha     + rpo_alpha * NLL (TRL v0.24.0 RPO; TRL 1.x writes it as ["sigmoid", "sft"]
                    with weights [1, rpo_alpha]); NLL as for sft
      wpo_weights   (w_w, w_l), per-sequence WPO weights w = exp(mean_t(logp_t - log sum_v p_v^2))
                    computed by the caller under no_grad (primitive B's log_sum_p2): the pair's total
                    is multiplied by w_w w_l (legacy: min(1, w_w w_l)). Not allowed with aot*.
      dpop_lambda   DPO-Positive [U]: h -> h - beta * lambda * max(0, l^r_w - l_w) (lambda = 50 in
                    the paper); acts on the pair-logit losses (sigmoid, cdpo, hinge, robust,
                    exo_pair, discopop) and raises with the others (sft excepted).
      rdpo_alpha    R-DPO [U]: h -> h + alpha (n_w - n_l) (reward beta r + alpha |y|, so a longer
                    chosen answer needs less log-ratio margin); same scope as dpop_lambda.
    LD-DPO (`ld_alpha`) reweights tokens before the per-sequence sum: it lives in the fused module,
    whose sums are what you pass here.

    reduction: 'mean' = sum_k lambda_k mean_b loss_k; 'sum' the sum over pairs; 'none' the [B] totals.
    metrics (TRL names, detached means over the batch, §3.9): rewards/chosen = mean beta r_w,
    rewards/rejected = mean beta r_l, rewards/accuracies = mean 1[beta r_w > beta r_l],
    rewards/margins = mean beta (r_w - r_l), logps/chosen = mean l_w, logps/rejected = mean l_l
    (raw r even with an f-divergence; legacy ipo: the length-averaged values); plus nll_loss when
    sft or rpo_alpha uses an NLL. (TRL v0.24.0 scaled its logged rewards by sum(loss_weights);
    flashloss does not.) Token-level metrics (logits/*, entropy, mean_token_accuracy) belong to
    whoever holds the tokens (the fused module).
    """
    check_reduction(reduction)
    _check_backend(backend)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    legacy = convention == "trl_legacy"
    types = _loss_types(loss_type)
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [float(w) for w in loss_weights]
        if len(weights) != len(types):
            raise ValueError(f"loss_weights must have one weight per loss type ({len(types)}: {types}), "
                             f"got {len(weights)}")
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCE_TYPES}, got {f_divergence_type!r}")
    if f_divergence_type != "reverse_kl":
        if legacy and f_divergence_type == "forward_kl":
            raise ValueError("TRL v0.24.0 (convention='trl_legacy') has no 'forward_kl': it is "
                             "f_divergence_type='alpha_divergence' with f_alpha_divergence_coef=1.0 there")
        bad = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
        if bad and not legacy:
            raise ValueError(f"f_divergence_type={f_divergence_type!r} is only supported with the loss types "
                             f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; got {bad}. Use f_divergence_type='reverse_kl' "
                             f"with these losses.")
    if f_alpha_divergence_coef is None:
        f_alpha_divergence_coef = 1.0 if legacy else 0.5
    f_alpha = _float_arg("f_alpha_divergence_coef", f_alpha_divergence_coef)
    eps = _float_arg("label_smoothing", label_smoothing, 0.0, 0.5)
    if "robust" in types and not eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type 'robust', got {eps}")
    if "exo_pair" in types and eps == 0.0 and not legacy:
        raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    tau = _float_arg("discopop_tau", discopop_tau, 0.0, lo_open=True)
    if not isinstance(update_bco_state, bool):
        raise TypeError(f"update_bco_state must be a bool, got {type(update_bco_state).__name__}")
    if bco_state is not None:
        if not isinstance(bco_state, RunningMean):
            raise TypeError(f"bco_state must be a flashloss.preference.RunningMean, got {type(bco_state).__name__}")
        if not (legacy and "bco_pair" in types):
            raise ValueError("bco_state is only used by loss_type 'bco_pair' under convention='trl_legacy' "
                             "(TRL 1.x bco_pair has no running mean)")

    dt = _acc_dtype(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    pc = _vec("policy_chosen", policy_chosen, None, dt)
    n, device = pc.shape[0], pc.device
    pr = _vec("policy_rejected", policy_rejected, n, dt)
    rc, rr = _refs(ref_chosen, ref_rejected, n, dt, device)
    n_w = _lengths("chosen_lengths", chosen_lengths, n, dt)
    n_l = _lengths("rejected_lengths", rejected_lengths, n, dt)
    if (n_w is None) != (n_l is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
    beta = _beta(beta, n, dt)
    if _is_tensor_beta(beta) and _SORTING_TYPES.intersection(types):
        raise ValueError("aot and aot_unpaired sort over the batch: beta must be a scalar, not a per-pair tensor")

    need_lengths = sorted(_LENGTH_TYPES.intersection(types))
    if rdpo_alpha is not None:
        need_lengths.append("rdpo_alpha")
    if need_lengths and n_w is None:
        raise ValueError(f"{', '.join(need_lengths)} need chosen_lengths and rejected_lengths (completion token counts)")

    mods = [m for m, v in (("dpop_lambda", dpop_lambda), ("rdpo_alpha", rdpo_alpha)) if v is not None]
    if mods:
        bad = [t for t in types if t not in _PAIR_LOGIT_TYPES and t != "sft"]
        if bad:
            raise ValueError(f"{' and '.join(mods)} modify the pair logit h and apply to {sorted(_PAIR_LOGIT_TYPES)}; "
                             f"got loss types {bad}")
    dpop = None if dpop_lambda is None else _float_arg("dpop_lambda", dpop_lambda, 0.0)
    rdpo = None if rdpo_alpha is None else _float_arg("rdpo_alpha", rdpo_alpha)

    w_pair = None
    if wpo_weights is not None:
        if _SORTING_TYPES.intersection(types):
            raise ValueError("wpo_weights are not supported with aot or aot_unpaired: they sort the batch, "
                             "which would misalign per-pair weights")
        if not isinstance(wpo_weights, (tuple, list)) or len(wpo_weights) != 2:
            raise ValueError("wpo_weights must be a pair (chosen_weights, rejected_weights) of [B] tensors")
        ww = _vec("wpo_weights[0]", wpo_weights[0], n, dt).detach()
        wl = _vec("wpo_weights[1]", wpo_weights[1], n, dt).detach()
        w_pair = ww * wl
        if legacy:
            w_pair = w_pair.clamp_max(1.0)

    # NLL for sft / RPO: given, or the token mean over the chosen completions (raw sums)
    nll = None
    if "sft" in types or rpo_alpha is not None:
        if chosen_nll is not None:
            nll = _scalar_or_vec("chosen_nll", chosen_nll, n, dt, device)
        elif chosen_lengths is None:
            raise ValueError("loss_type 'sft' and rpo_alpha need chosen_nll, or chosen_lengths to form the "
                             "token-mean NLL of the chosen completions from policy_chosen")
        else:
            total = chosen_lengths.detach().to(dt).sum().clamp_min(1.0)
            nll = (-pc.sum() / total).expand(n)
    rpo = None if rpo_alpha is None else _float_arg("rpo_alpha", rpo_alpha)

    if legacy and "ipo" in types:  # TRL v0.24.0 averages every log-prob once ipo is in the list
        pc, pr, rc, rr = pc / n_w, pr / n_l, rc / n_w, rr / n_l
    r_w, r_l = pc - rc, pr - rr

    # scores and the pair logit
    alpha = 1.0 - f_alpha if legacy else f_alpha  # legacy a' is 1 - a
    s_w = _f_scores(r_w, f_divergence_type, alpha, EXP_CLAMP)
    s_l = _f_scores(r_l, f_divergence_type, alpha, EXP_CLAMP)

    def pair_logit(d):
        h = beta * d
        if dpop is not None:
            h = h - beta * dpop * torch.relu(-r_w)
        if rdpo is not None:
            h = h + rdpo * (n_w - n_l)
        return h

    h = pair_logit(s_w - s_l)
    half_inv_beta = 0.5 / beta

    total = None
    for t, lam in zip(types, weights):
        if t == "sigmoid":
            loss = _smoothed_sigmoid(h, eps) if legacy else -_logsigmoid(h)
        elif t == "cdpo":
            loss = _smoothed_sigmoid(h, eps)
        elif t == "hinge":
            loss = torch.relu(1.0 - h)
        elif t == "ipo":
            d = (s_w - s_l) if legacy else (s_w / n_w - s_l / n_l)
            loss = (d - half_inv_beta) ** 2
        elif t == "exo_pair":
            e = eps if eps > 0 else 1e-3  # (0 only reaches here under legacy)
            lp, lm = _logsigmoid(h), _logsigmoid(-h)
            loss = lp.exp() * (lp - math.log1p(-e)) + lm.exp() * (lm - math.log(e))
        elif t == "nca_pair":
            a, b = beta * r_w, beta * r_l
            loss = -_logsigmoid(a) - 0.5 * _logsigmoid(-a) - 0.5 * _logsigmoid(-b)
        elif t == "robust":
            loss = (-(1.0 - eps) * _logsigmoid(h) + eps * _logsigmoid(-h)) / (1.0 - 2.0 * eps)
        elif t == "bco_pair":
            a, b = beta * r_w, beta * r_l
            if legacy:
                if bco_state is None and torch.compiler.is_compiling():
                    # a fresh state's mean is this batch's mean: computed in the graph (the
                    # RunningMean update is host-side Python state, docs/DECISIONS.md "Hardening")
                    delta = torch.cat([a, b]).detach().mean()
                else:
                    state = bco_state if bco_state is not None else RunningMean()
                    if update_bco_state:
                        state.update(torch.cat([a, b]).detach().mean())
                    delta = state.mean
                a, b = a - delta, b - delta
            loss = -_logsigmoid(a) - _logsigmoid(-b)
        elif t == "sppo_hard":
            loss = (r_w - half_inv_beta) ** 2 + (r_l + half_inv_beta) ** 2
        elif t in _SORTING_TYPES:
            if t == "aot":
                d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
            else:
                d = torch.sort(r_w).values - torch.sort(r_l).values
            loss = _smoothed_sigmoid(beta * d, eps)
        elif t == "apo_zero":
            loss = 1.0 - torch.sigmoid(beta * r_w) + torch.sigmoid(beta * r_l)
        elif t == "apo_down":
            loss = torch.sigmoid(beta * r_w) + 1.0 - torch.sigmoid(beta * (r_w - r_l))
        elif t == "discopop":
            rho = pair_logit(r_w - r_l) if legacy else h
            loss = (-_logsigmoid(rho)) * torch.sigmoid(-rho / tau) + torch.exp(_logsigmoid(rho / tau) - rho)
        elif t == "sft":
            loss = nll
        else:  # sigmoid_norm
            loss = -_logsigmoid(beta * (s_w / n_w - s_l / n_l))
        loss = loss * lam if lam != 1.0 else loss
        total = loss if total is None else total + loss
    if rpo is not None:
        total = total + rpo * nll
    if w_pair is not None:
        total = total * w_pair
    total = total.expand(n) if total.dim() == 0 else total

    metrics = _pair_metrics(beta, r_w, r_l, pc, pr, dt)
    if nll is not None:
        metrics["nll_loss"] = nll.detach().mean()
    return _reduce(total, reduction), metrics


dpo_loss = preference_loss


@same_device
def ipo_loss(policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None, beta=0.1, *,
             chosen_lengths=None, rejected_lengths=None, **kwargs):
    """IPO (OBJECTIVES.md §3.2, beta plays tau): (s_w/n_w - s_l/n_l - 1/(2 beta))^2 per pair, the
    log-ratio scores averaged over completion lengths as TRL (confirmed with the IPO authors).
    Lengths are required; for the unnormalised paper form pass lengths of ones. Other keyword
    arguments (reduction, convention, f_divergence_type, wpo_weights, ...) and the returned
    (loss, metrics) are those of preference_loss(loss_type="ipo")."""
    if "loss_type" in kwargs:
        raise TypeError("ipo_loss takes no loss_type (use preference_loss)")
    return preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, "ipo", beta,
                           chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **kwargs)


# ---------------------------------------------------------------------------------------------
# 3.4 reference-free pairwise: CPO, SimPO, AlphaPO, ORPO

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def _means(lw, ll, chosen_lengths, rejected_lengths, n, dt):
    """Per-token means: sums divided by the lengths, or the inputs themselves without lengths."""
    nw = _lengths("chosen_lengths", chosen_lengths, n, dt)
    nl = _lengths("rejected_lengths", rejected_lengths, n, dt)
    if (nw is None) != (nl is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
    return (lw, ll) if nw is None else (lw / nw, ll / nl)


def _alphapo_reward(lp: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO reward (1 - p^{-alpha}) / alpha with p = e^{lp}, as -expm1(-alpha lp)/alpha with the
    exp argument clamped to <= 80; alpha = 0 is lp itself."""
    if alpha == 0.0:
        return lp
    return -torch.expm1((-alpha * lp).clamp_max(EXP_CLAMP)) / alpha


@same_device
def cpo_loss(policy_chosen, policy_rejected, chosen_nll=None, *, loss_type: str = "sigmoid", beta=0.1,
             cpo_alpha: float = 1.0, label_smoothing: float = 0.0, simpo_gamma: float = 0.5, alpha: float = 0.0,
             chosen_lengths=None, rejected_lengths=None, reduction: str = "mean", backend: str = "auto"):
    """CPO family, reference-free (OBJECTIVES.md §3.4), numbers as TRL `CPOTrainer`.

    The log-probs l used: per-sequence sums for sigmoid and hinge; per-token means for ipo and
    simpo (give sums with chosen_lengths/rejected_lengths, or the means themselves with
    lengths=None, as TRL's `average_log_prob`). With `alpha` != 0 (AlphaPO) each l is replaced by
    the reward (1 - e^{-alpha l})/alpha (stable form, clamped) before the loss. D = l_w - l_l:
      sigmoid  -(1 - eps) log sigma(beta D) - eps log sigma(-beta D)
      hinge    max(0, 1 - beta D)                    (label smoothing ignored, as TRL)
      ipo      (D - 1/(2 beta))^2                     (label smoothing ignored, as TRL)
      simpo    z = beta D - simpo_gamma, -(1 - eps) log sigma(z) - eps log sigma(-z)
      alphapo  TRL's shorthand: simpo with cpo_alpha forced to 0
    Total = reduce(loss) + cpo_alpha * chosen_nll, chosen_nll the token-mean CE over the chosen
    completion tokens (0-d, or [B]; required when cpo_alpha != 0). Defaults beta 0.1, cpo_alpha 1.0,
    simpo_gamma 0.5 (TRL).
    metrics: rewards/chosen = mean beta l_w (AlphaPO: beta times the reward), rewards/rejected,
    rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (the l used: means for
    ipo/simpo), nll_loss (when chosen_nll is given).
    """
    check_reduction(reduction)
    _check_backend(backend)
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r} for cpo_loss; valid: {list(CPO_LOSS_TYPES)}")
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    eps = _float_arg("label_smoothing", label_smoothing, 0.0, 0.5)
    cpo_alpha = _float_arg("cpo_alpha", cpo_alpha)
    gamma = _float_arg("simpo_gamma", simpo_gamma)
    alpha = _float_arg("alpha", alpha)
    dt = _acc_dtype(policy_chosen, policy_rejected)
    lw = _vec("policy_chosen", policy_chosen, None, dt)
    n, device = lw.shape[0], lw.device
    ll = _vec("policy_rejected", policy_rejected, n, dt)
    beta = _beta(beta, n, dt)
    if loss_type in ("ipo", "simpo"):
        lw, ll = _means(lw, ll, chosen_lengths, rejected_lengths, n, dt)
    else:
        _lengths("chosen_lengths", chosen_lengths, n, dt)
        _lengths("rejected_lengths", rejected_lengths, n, dt)
    nll = None
    if chosen_nll is not None:
        nll = _scalar_or_vec("chosen_nll", chosen_nll, n, dt, device)
    elif cpo_alpha != 0.0:
        raise ValueError("cpo_loss needs chosen_nll (token-mean NLL of the chosen completions) when "
                         "cpo_alpha != 0; pass cpo_alpha=0 for the preference term alone")
    rw, rl = _alphapo_reward(lw, alpha), _alphapo_reward(ll, alpha)
    d = rw - rl
    if loss_type == "sigmoid":
        per = _smoothed_sigmoid(beta * d, eps)
    elif loss_type == "hinge":
        per = torch.relu(1.0 - beta * d)
    elif loss_type == "ipo":
        per = (d - 0.5 / beta) ** 2
    else:  # simpo
        per = _smoothed_sigmoid(beta * d - gamma, eps)
    if cpo_alpha != 0.0:
        per = per + cpo_alpha * nll
    per = per.expand(n) if per.dim() == 0 else per
    metrics = _pair_metrics(beta, rw, rl, lw, ll, dt)
    if nll is not None:
        metrics["nll_loss"] = nll.detach().mean()
    return _reduce(per, reduction), metrics


@same_device
def simpo_loss(policy_chosen, policy_rejected, chosen_lengths=None, rejected_lengths=None, beta=0.1,
               gamma: float = 0.5, *, label_smoothing: float = 0.0, reduction: str = "mean",
               backend: str = "auto"):
    """SimPO (OBJECTIVES.md §3.4): z = beta (lbar_w - lbar_l) - gamma,
    loss = -(1 - eps) log sigma(z) - eps log sigma(-z), lbar the per-token mean log-prob (give sums
    with lengths, or means with lengths=None). TRL defaults beta 0.1, gamma 0.5 (`CPOTrainer`
    loss_type "simpo", cpo_alpha 0); the SimPO paper uses beta ~ 2-2.5, gamma ~ 0.3-1.6.
    Returns (loss, metrics) as cpo_loss."""
    return cpo_loss(policy_chosen, policy_rejected, None, loss_type="simpo", beta=beta, cpo_alpha=0.0,
                    label_smoothing=label_smoothing, simpo_gamma=gamma, chosen_lengths=chosen_lengths,
                    rejected_lengths=rejected_lengths, reduction=reduction, backend=backend)


@same_device
def alphapo_loss(policy_chosen, policy_rejected, chosen_lengths=None, rejected_lengths=None, *, alpha: float,
                 beta=0.1, gamma: float = 0.5, label_smoothing: float = 0.0, reduction: str = "mean",
                 backend: str = "auto"):
    """AlphaPO (OBJECTIVES.md §3.4): SimPO on the rewards rho(y) = (1 - p^{-alpha})/alpha,
    p = e^{lbar}, computed as -expm1(-alpha lbar)/alpha with -alpha lbar clamped to <= 80;
    alpha = 0 is SimPO. `alpha` has no default (TRL has none; the paper's values are [U]).
    Same as TRL `CPOTrainer` loss_type "alphapo". Returns (loss, metrics) as cpo_loss (rewards are
    beta * rho)."""
    return cpo_loss(policy_chosen, policy_rejected, None, loss_type="simpo", beta=beta, cpo_alpha=0.0,
                    label_smoothing=label_smoothing, simpo_gamma=gamma, alpha=alpha, chosen_lengths=chosen_lengths,
                    rejected_lengths=rejected_lengths, reduction=reduction, backend=backend)


@same_device
def orpo_loss(policy_chosen, policy_rejected, chosen_nll=None, *, beta=0.1, chosen_lengths=None,
              rejected_lengths=None, reduction: str = "mean", backend: str = "auto"):
    """ORPO (OBJECTIVES.md §3.4), numbers as TRL `ORPOTrainer`: with per-token mean log-probs lbar
    (give sums with lengths, or the means with lengths=None), in fp32 at least and clamped to
    <= -1e-7 (-1e-15 in float64) so that a certain sequence does not give log 0:
      log-odds o = lbar - log(1 - e^{lbar}) (log1mexp), z = o_w - o_l,
      per pair: NLL_w - beta log sigma(z);   total = NLL_w - beta mean_b log sigma(z).
    `chosen_nll` (0-d or [B]; None = 0, the odds-ratio term alone) is the chosen sequence's
    token-mean CE: TRL counts prompt and completion tokens, Liger completion tokens only; that
    choice is the caller's. beta (the paper's lambda) defaults to 0.1.
    metrics (TRL names): rewards/chosen = mean beta lbar_w, rewards/rejected, rewards/accuracies,
    rewards/margins, logps/chosen, logps/rejected (means), nll_loss (when given),
    log_odds_ratio = mean log sigma(z), log_odds_chosen = mean z.
    """
    check_reduction(reduction)
    _check_backend(backend)
    dt = _acc_dtype(policy_chosen, policy_rejected)
    lw = _vec("policy_chosen", policy_chosen, None, dt)
    n, device = lw.shape[0], lw.device
    ll = _vec("policy_rejected", policy_rejected, n, dt)
    beta = _beta(beta, n, dt)
    lw, ll = _means(lw, ll, chosen_lengths, rejected_lengths, n, dt)
    top = -1e-15 if dt == torch.float64 else -1e-7
    lw_c, ll_c = lw.clamp_max(top), ll.clamp_max(top)
    z = (lw_c - ll_c) - (_log1mexp(lw_c) - _log1mexp(ll_c))
    ratio = _logsigmoid(z)
    per = -beta * ratio
    nll = None
    if chosen_nll is not None:
        nll = _scalar_or_vec("chosen_nll", chosen_nll, n, dt, device)
        per = per + nll
    per = per.expand(n) if per.dim() == 0 else per
    metrics = _pair_metrics(beta, lw, ll, lw, ll, dt)
    if nll is not None:
        metrics["nll_loss"] = nll.detach().mean()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = z.detach().mean()
    return _reduce(per, reduction), metrics


# ---------------------------------------------------------------------------------------------
# 3.5 unpaired and one-sided: KTO, BCO, NPO

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _desirable(desirable, n: int) -> torch.Tensor:
    _tensor("desirable", desirable, (1,), (n,), "policy_logps", floating=False)
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor (True = desirable example), got {desirable.dtype}")
    return desirable


def _unpaired_metrics(rewards, logps, desirable, dt) -> dict:
    """Per-class means (TRL KTO names); a class absent from the batch has no entry. Inside
    torch.compile the entries cannot depend on the data: every entry is present, and an absent
    class's means are NaN (the mean of an empty set)."""
    m = {}
    with torch.no_grad():
        if torch.compiler.is_compiling():
            for key, sel in (("chosen", desirable), ("rejected", ~desirable)):
                cnt = sel.sum().to(dt)
                m[f"rewards/{key}"] = torch.where(sel, rewards.detach(), 0.0).sum() / cnt
                m[f"logps/{key}"] = torch.where(sel, logps.detach().to(dt), 0.0).sum() / cnt
            m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
            m["count/chosen"] = desirable.sum().to(dt)
            m["count/rejected"] = (~desirable).sum().to(dt)
            return m
        for key, sel in (("chosen", desirable), ("rejected", ~desirable)):
            if bool(sel.any()):
                m[f"rewards/{key}"] = rewards.detach()[sel].mean()
                m[f"logps/{key}"] = logps.detach()[sel].mean()
        if "rewards/chosen" in m and "rewards/rejected" in m:
            m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
        m["count/chosen"] = desirable.sum().to(dt)
        m["count/rejected"] = (~desirable).sum().to(dt)
    return m


@same_device
def kto_loss(policy_logps, ref_logps, desirable, policy_kl_logps=None, ref_kl_logps=None, *, beta=0.1,
             loss_type: str = "kto", desirable_weight: float = 1.0, undesirable_weight: float = 1.0, kl=None,
             reduction: str = "mean", backend: str = "auto"):
    """KTO on unpaired examples (OBJECTIVES.md §3.5), numbers as TRL `KTOTrainer` (1.x and v0.24.0).

    Per example: r = l - l^r (summed log-probs; ref_logps None = 0), `desirable` [B] bool.
      kto:  z0 = max(0, sg(mean_j(l^KL_j - l^{r,KL}_j))), from the KL batch (each prompt paired
            with another example's completion, e.g. a cyclic shift by one in the batch: building it
            is the caller's job, so is running the models on it without grad), or given as `kl`
            (a float or 0-d tensor; in multi-process training the mean over ranks, clamped here);
            desirable: w_D (1 - sigma(beta (r - z0))), undesirable: w_U (1 - sigma(beta (z0 - r))).
      apo_zero_unpaired: desirable w_D (1 - sigma(beta r)), undesirable w_U sigma(beta r); no z0.
    'mean' is TRL's nanmean over all examples (not per class), 'sum' a nansum; 'none' gives the
    [B] weighted losses in input order.
    metrics: kl (z0; 0 for apo_zero_unpaired), rewards/chosen, logps/chosen (means over desirable
    examples), rewards/rejected, logps/rejected (undesirable), rewards/margins (difference of the two
    means; only when both classes are present; absent classes have no entry), count/chosen,
    count/rejected.
    """
    check_reduction(reduction)
    _check_backend(backend)
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r} for kto_loss; valid: {list(KTO_LOSS_TYPES)}")
    wd = _float_arg("desirable_weight", desirable_weight, 0.0)
    wu = _float_arg("undesirable_weight", undesirable_weight, 0.0)
    dt = _acc_dtype(policy_logps, ref_logps, policy_kl_logps, ref_kl_logps)
    lp = _vec("policy_logps", policy_logps, None, dt, "")
    n, device = lp.shape[0], lp.device
    lr = _ref("ref_logps", ref_logps, n, dt, device, "policy_logps")
    d = _desirable(desirable, n)
    beta = _beta(beta, n, dt, like="policy_logps")
    r = lp - lr
    if loss_type == "kto":
        if kl is not None:
            if policy_kl_logps is not None or ref_kl_logps is not None:
                raise ValueError("give kl, or policy_kl_logps (and ref_kl_logps), not both")
            z0 = torch.as_tensor(kl, dtype=dt, device=device).detach()
            if z0.dim() != 0:
                raise ValueError(f"kl must be a float or a 0-d tensor, got shape {list(z0.shape)}")
        elif policy_kl_logps is None:
            raise ValueError("loss_type 'kto' needs the KL batch: policy_kl_logps (and ref_kl_logps), or kl")
        else:
            pk = _vec("policy_kl_logps", policy_kl_logps, None, dt, "")
            rk = _ref("ref_kl_logps", ref_kl_logps, pk.shape[0], dt, device, "policy_kl_logps")
            if (ref_kl_logps is None) != (ref_logps is None):
                raise ValueError("give ref_kl_logps exactly when ref_logps is given")
            z0 = (pk - rk).detach().mean()
        z0 = z0.clamp_min(0.0)
        per = torch.where(d, wd * (1.0 - torch.sigmoid(beta * (r - z0))), wu * (1.0 - torch.sigmoid(beta * (z0 - r))))
    else:
        if policy_kl_logps is not None or ref_kl_logps is not None or kl is not None:
            raise ValueError("loss_type 'apo_zero_unpaired' uses no KL term; do not pass policy_kl_logps/kl")
        z0 = torch.zeros((), dtype=dt, device=device)
        s = torch.sigmoid(beta * r)
        per = torch.where(d, wd * (1.0 - s), wu * s)
    metrics = {"kl": z0.detach()}
    metrics.update(_unpaired_metrics(beta * r, lp, d, dt))
    return _reduce(per, reduction, nan=True), metrics


def udm_weight(prob_desirable: torch.Tensor, min_ratio: float = 0.5, max_ratio: float = 10.0) -> torch.Tensor:
    """BCO's underlying-distribution-matching weight u = clamp(p / (1 - p + 1e-8), min_ratio, max_ratio)
    from a prompt classifier's probability p that the prompt belongs to the desirable set (TRL
    `BCOTrainer._get_udm_weight`); pass it to bco_loss(udm_weights=...)."""
    _tensor("prob_desirable", prob_desirable, (1,))
    return (prob_desirable / (1.0 - prob_desirable + 1e-8)).clamp(min=min_ratio, max=max_ratio)


@same_device
def bco_loss(policy_logps, ref_logps, desirable, *, beta=0.1, state: Optional[RunningMean] = None,
             update_state: bool = True, udm_weights=None, reduction: str = "mean", backend: str = "auto"):
    """BCO on unpaired examples (OBJECTIVES.md §3.5), numbers as TRL v0.24.0 `BCOTrainer.bco_loss`.

    Rewards R = beta (l - l^r) per example; delta = running mean over *all individual* rewards
    seen so far (desirable and undesirable), kept in `state` (a RunningMean: one per training run;
    with several processes, gather the rewards first). With update_state (training) the current
    batch's rewards are added before delta is read; evaluation passes update_state=False. Without
    a state, a fresh one is used (delta = this batch's mean reward, or 0 without update).
      desirable:   -log sigma(R - delta)
      undesirable: u (-log sigma(-(R - delta))), u = udm_weights [B] (see udm_weight; default 1;
                   values at desirable examples are ignored)
    'mean' is a nanmean over all examples, 'sum' a nansum, 'none' the [B] losses in input order.
    metrics: delta, and as kto_loss: rewards/chosen, logps/chosen, rewards/rejected, logps/rejected,
    rewards/margins, count/chosen, count/rejected.
    """
    check_reduction(reduction)
    _check_backend(backend)
    if state is not None and not isinstance(state, RunningMean):
        raise TypeError(f"state must be a flashloss.preference.RunningMean, got {type(state).__name__}")
    dt = _acc_dtype(policy_logps, ref_logps)
    lp = _vec("policy_logps", policy_logps, None, dt, "")
    n, device = lp.shape[0], lp.device
    lr = _ref("ref_logps", ref_logps, n, dt, device, "policy_logps")
    d = _desirable(desirable, n)
    beta = _beta(beta, n, dt, like="policy_logps")
    rew = beta * (lp - lr)
    if state is None and torch.compiler.is_compiling():
        # a fresh state's mean is this batch's mean: computed in the graph (the RunningMean update
        # is host-side Python state and cannot be; docs/DECISIONS.md "Hardening")
        delta = rew.detach().mean()
    else:
        state = state if state is not None else RunningMean()
        if update_state:
            state.update(rew.detach())
        delta = state.mean
    x = rew - delta
    undesirable = -_logsigmoid(-x)
    if udm_weights is not None:
        undesirable = undesirable * _vec("udm_weights", udm_weights, n, dt, "policy_logps").detach()
    per = torch.where(d, -_logsigmoid(x), undesirable)
    metrics = {"delta": delta.detach() if isinstance(delta, torch.Tensor) else torch.tensor(delta, dtype=dt, device=device)}
    metrics.update(_unpaired_metrics(rew, lp, d, dt))
    return _reduce(per, reduction, nan=True), metrics


@same_device
def npo_loss(policy_logps, ref_logps=None, *, beta=0.1, retain_nll=None, retain_kl=None,
             retain_weight: float = 1.0, reduction: str = "mean", backend: str = "auto"):
    """NPO (negative preference optimisation, OBJECTIVES.md §3.5) on the forget set:
    r = l - l^r (summed log-probs), per example (2/beta) softplus(beta r) = -(2/beta) log sigma(-beta r);
    beta defaults to 0.1. Retain variants add retain_weight (lambda, default 1) times a batch-level term
    given as a 0-d tensor: `retain_nll` (token-mean NLL on retain data: NPO-RT / grad-diff) or
    `retain_kl` (per-token KL(pi_ref || pi_theta) on retain data, e.g. flashloss.vocab_kl with the
    reference as teacher: NPO-KL; its per-token normalisation is [U], the caller's choice).
    metrics: npo_loss (mean of the NPO term), retain_loss (when given), rewards/forget = mean beta r,
    logps/forget = mean l.
    """
    check_reduction(reduction)
    _check_backend(backend)
    if retain_nll is not None and retain_kl is not None:
        raise ValueError("give retain_nll or retain_kl, not both")
    lam = _float_arg("retain_weight", retain_weight)
    dt = _acc_dtype(policy_logps, ref_logps)
    lp = _vec("policy_logps", policy_logps, None, dt, "")
    n = lp.shape[0]
    lr = _ref("ref_logps", ref_logps, n, dt, lp.device, "policy_logps")
    beta = _beta(beta, n, dt, like="policy_logps")
    r = lp - lr
    npo = (2.0 / beta) * softplus(beta * r)
    per = npo
    retain = retain_nll if retain_nll is not None else retain_kl
    name = "retain_nll" if retain_nll is not None else "retain_kl"
    if retain is not None:
        _tensor(name, retain, (0,))
        retain = retain.to(dt)
        per = per + lam * retain
    metrics = {"npo_loss": npo.detach().mean()}
    if retain is not None:
        metrics["retain_loss"] = retain.detach()
    with torch.no_grad():
        metrics["rewards/forget"] = (beta * r).detach().mean()
        metrics["logps/forget"] = lp.detach().mean()
    return _reduce(per, reduction), metrics


# ---------------------------------------------------------------------------------------------
# 3.6 token-level preference: TDPO


@same_device
def tdpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, kl_chosen, kl_rejected, *, beta=0.1,
              alpha: float = 0.5, version: int = 2, reduction: str = "mean", backend: str = "auto"):
    """TDPO (OBJECTIVES.md §3.6), numbers as the authors' `tdpo_loss`. Inputs per pair: summed
    log-probs (reference None = 0, so log-ratios can be passed as policy_* directly) and
    K_w = kl_chosen, K_l = kl_rejected, the per-sequence sums over completion tokens of the
    per-token KL(pi_ref || pi_theta) (flashloss.vocab_kl with reduction='none', summed per
    sequence), with grad. With r = l - l^r:
      TDPO1 (version=1): logits = (r_w - r_l) - (K_l - K_w)
      TDPO2 (version=2, default): logits = (r_w - r_l) - alpha (K_l - sg(K_w)), alpha = 0.5
      loss = -log sigma(beta logits), beta = 0.1.
    metrics: rewards/chosen = mean beta (r_w + K_w), rewards/rejected = mean beta (r_l + K_l),
    rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, kl/chosen, kl/rejected.
    """
    check_reduction(reduction)
    _check_backend(backend)
    if version not in (1, 2):
        raise ValueError(f"version must be 1 (TDPO1) or 2 (TDPO2), got {version!r}")
    alpha = _float_arg("alpha", alpha)
    dt = _acc_dtype(policy_chosen, policy_rejected, ref_chosen, ref_rejected, kl_chosen, kl_rejected)
    pc = _vec("policy_chosen", policy_chosen, None, dt)
    n = pc.shape[0]
    pr = _vec("policy_rejected", policy_rejected, n, dt)
    rc, rr = _refs(ref_chosen, ref_rejected, n, dt, pc.device)
    kw = _vec("kl_chosen", kl_chosen, n, dt)
    kl_ = _vec("kl_rejected", kl_rejected, n, dt)
    beta = _beta(beta, n, dt)
    r_w, r_l = pc - rc, pr - rr
    if version == 1:
        logits = (r_w - r_l) - (kl_ - kw)
    else:
        logits = (r_w - r_l) - alpha * (kl_ - kw.detach())
    per = -_logsigmoid(beta * logits)
    metrics = _pair_metrics(beta, r_w + kw, r_l + kl_, pc, pr, dt)
    metrics["kl/chosen"] = kw.detach().mean()
    metrics["kl/rejected"] = kl_.detach().mean()
    return _reduce(per, reduction), metrics


# ---------------------------------------------------------------------------------------------
# 3.7 listwise: LiPO-lambda, Plackett-Luce


def _lists(policy_logps, ref_logps, labels, mask, beta):
    _tensor("policy_logps", policy_logps, (2,))
    shape = tuple(policy_logps.shape)
    dt = _acc_dtype(policy_logps, ref_logps)
    lp = policy_logps.to(dt)
    if ref_logps is not None:
        _tensor("ref_logps", ref_logps, (2,), shape, "policy_logps")
        lp = lp - ref_logps.detach().to(dt)
    _tensor("labels", labels, (2,), shape, "policy_logps", floating=False)
    if labels.dtype == torch.bool:
        raise TypeError("labels must be graded relevance values (int or float), got bool")
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool, device=lp.device)
    else:
        _tensor("mask", mask, (2,), shape, "policy_logps", floating=False)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = real item), got {mask.dtype}")
    if isinstance(beta, torch.Tensor) and beta.dim() == 1:
        if beta.shape[0] != shape[0]:
            raise ValueError(f"beta must be a float, a 0-d tensor or a per-list [L={shape[0]}] tensor, "
                             f"got shape {list(beta.shape)}")
        beta = _beta(beta, shape[0], dt, like="policy_logps rows")[:, None]
    else:
        beta = _beta(beta, shape[0], dt, like="policy_logps rows")
    return beta * lp, labels.to(dt), mask, dt


@same_device
def lipo_lambda_loss(policy_logps, ref_logps=None, labels=None, mask=None, *, beta=0.1, reduction: str = "mean",
                     backend: str = "auto"):
    """LiPO-lambda listwise loss (OBJECTIVES.md §3.7) over L lists of K responses ([L, K] inputs;
    `mask` [L, K] bool marks real items, padding excluded everywhere). Scores s = beta (l - l^r)
    (summed log-probs; ref None = 0), graded labels psi:
      loss_list = sum_{i,j valid, psi_i > psi_j} D_ij softplus(-(s_i - s_j)),
      D_ij = |G_i - G_j| |1/log2(1 + tau_i) - 1/log2(1 + tau_j)|, G = 2^psi - 1,
    tau_i the 1-based rank of item i when the list's valid scores are sorted descending (ties by
    index); tau and D are constants (stop-gradient). Decisions on the [U] points: D is not
    normalised by the ideal DCG and the log base is 2 (both only rescale the loss). beta: float or
    per-list [L]. 'none' gives [L] (0 for a list without an ordered pair); 'mean' averages over the
    lists that have at least one pair (count clamped >= 1).
    metrics: rewards/mean = mean score of valid items, rewards/accuracies = fraction of ordered
    pairs (psi_i > psi_j) with s_i > s_j, num_pairs.
    """
    check_reduction(reduction)
    _check_backend(backend)
    if labels is None:
        raise ValueError("lipo_lambda_loss needs labels [L, K]")
    s, psi, mask, dt = _lists(policy_logps, ref_logps, labels, mask, beta)
    with torch.no_grad():
        neg_inf = torch.tensor(float("-inf"), dtype=dt, device=s.device)
        order = torch.sort(torch.where(mask, s.detach(), neg_inf), dim=-1, descending=True, stable=True).indices
        tau = torch.empty_like(order)
        pos = torch.arange(1, s.shape[-1] + 1, device=s.device).expand_as(order)
        tau.scatter_(-1, order, pos)
        inv_d = 1.0 / torch.log2(1.0 + tau.to(dt))
        gain = torch.pow(2.0, psi) - 1.0
        delta = (gain[:, :, None] - gain[:, None, :]).abs() * (inv_d[:, :, None] - inv_d[:, None, :]).abs()
        pairs = mask[:, :, None] & mask[:, None, :] & (psi[:, :, None] > psi[:, None, :])
        weight = torch.where(pairs, delta, torch.zeros_like(delta))
    diff = s[:, :, None] - s[:, None, :]
    per_pair = weight * softplus(-diff)
    per_list = per_pair.sum(dim=(-1, -2))
    valid_list = pairs.any(dim=-1).any(dim=-1)
    with torch.no_grad():
        n_pairs = pairs.sum()
        metrics = {
            "rewards/mean": _masked_mean(s.detach(), mask, dt),
            "rewards/accuracies": ((diff.detach() > 0) & pairs).sum().to(dt) / n_pairs.clamp_min(1).to(dt),
            "num_pairs": n_pairs.to(dt),
        }
    if reduction == "mean":
        return per_list.sum() / valid_list.sum().clamp_min(1).to(dt), metrics
    return _reduce(per_list, reduction), metrics


@same_device
def plackett_luce_loss(policy_logps, ref_logps=None, labels=None, mask=None, *, beta=0.1, reduction: str = "mean",
                       backend: str = "auto"):
    """Plackett-Luce / ListMLE (DPO-PL) listwise loss (OBJECTIVES.md §3.7; allRank `listMLE` form).
    [L, K] inputs, `mask` [L, K] bool for real items (padding excluded), scores s = beta (l - l^r),
    graded labels (higher = better). pi = label order, best first, ties broken by index (allRank
    breaks them at random):
      loss_list = sum_{r=1}^{K_valid} [LSE_{r' >= r} s_pi(r') - s_pi(r)]   (suffix logcumsumexp),
    without allRank's 1e-10 inside the log. beta: float or per-list [L]. 'none' gives [L]; 'mean'
    averages over lists with at least one valid item (allRank averages over all lists; only fully
    padded lists differ).
    metrics: rewards/mean = mean score of valid items, top1_accuracy = fraction of lists whose
    best-labelled item has the highest score.
    """
    check_reduction(reduction)
    _check_backend(backend)
    if labels is None:
        raise ValueError("plackett_luce_loss needs labels [L, K]")
    s, psi, mask, dt = _lists(policy_logps, ref_logps, labels, mask, beta)
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=s.device)
    order = torch.sort(torch.where(mask, psi, neg_inf), dim=-1, descending=True, stable=True).indices
    s_sorted = torch.gather(s, -1, order)
    m_sorted = torch.gather(mask, -1, order)
    s_masked = torch.where(m_sorted, s_sorted, neg_inf)
    suffix = torch.logcumsumexp(s_masked.flip(-1), dim=-1).flip(-1)
    terms = torch.where(m_sorted, suffix - s_masked, torch.zeros_like(s_sorted))
    per_list = terms.sum(-1)
    valid_list = mask.any(-1)
    with torch.no_grad():
        best_true = order[:, :1]
        best_pred = torch.sort(torch.where(mask, s.detach(), neg_inf), dim=-1, descending=True, stable=True).indices[:, :1]
        top1 = ((best_true == best_pred).squeeze(-1) & valid_list).sum().to(dt) / valid_list.sum().clamp_min(1).to(dt)
        metrics = {
            "rewards/mean": _masked_mean(s.detach(), mask, dt),
            "top1_accuracy": top1,
        }
    if reduction == "mean":
        return per_list.sum() / valid_list.sum().clamp_min(1).to(dt), metrics
    return _reduce(per_list, reduction), metrics


# ---------------------------------------------------------------------------------------------
# 3.8 Bradley-Terry reward model


@same_device
def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None, *, center_rewards_coefficient=None,
                       label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "auto"):
    """Bradley-Terry reward-model loss (OBJECTIVES.md §3.8), numbers as TRL `RewardTrainer`.
    Scalar rewards r_c, r_r [B] (with grad), optional margin m [B] (or 0-d; detached), d = r_c - r_r - m:
      per pair: -(1 - eps) log sigma(d) - eps log sigma(-d) + c (r_c + r_r)^2,
    eps = label_smoothing (not in TRL), c = center_rewards_coefficient (None = off; TRL adds
    c * mean((r_c + r_r)^2) to the mean loss, the same thing).
    metrics (TRL names): accuracy = mean 1[r_c > r_r], margin = mean (r_c - r_r), min_reward,
    mean_reward, max_reward (over chosen and rejected rewards together).
    """
    check_reduction(reduction)
    _check_backend(backend)
    eps = _float_arg("label_smoothing", label_smoothing, 0.0, 0.5)
    dt = _acc_dtype(chosen_rewards, rejected_rewards)
    rc = _vec("chosen_rewards", chosen_rewards, None, dt, "")
    n = rc.shape[0]
    rr = _vec("rejected_rewards", rejected_rewards, n, dt, "chosen_rewards")
    d = rc - rr
    if margin is not None:
        d = d - _scalar_or_vec("margin", margin, n, dt, rc.device, "chosen_rewards").detach()
    per = _smoothed_sigmoid(d, eps)
    if center_rewards_coefficient is not None:
        c = _float_arg("center_rewards_coefficient", center_rewards_coefficient)
        per = per + c * (rc + rr) ** 2
    with torch.no_grad():
        both = torch.cat([rc.detach(), rr.detach()])
        metrics = {
            "accuracy": (rc > rr).to(dt).mean(),
            "margin": (rc - rr).detach().mean(),
            "min_reward": both.min(),
            "mean_reward": both.mean(),
            "max_reward": both.max(),
        }
    return _reduce(per, reduction), metrics
