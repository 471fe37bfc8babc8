"""`FusedLinearPreferenceLoss`: preference losses straight from the last hidden states and the
lm_head weight (DESIGN.md §4, OBJECTIVES.md §3), without the [2B, T, V] logits.

Pipeline (one autograd graph, no logits anywhere):
  1. labels -> targets with the causal shift (position t scores labels[t + 1]); prompt and padding
     tokens carry ignore_index.
  2. The scored rows of chosen and rejected hidden states are gathered into one [N_scored, H] block
     and sent through primitive B (`flashloss.token_logprobs`) once: per-token logp (with grad),
     and for the metrics / WPO entropy, z_sum and log_sum_p2 (used detached). Prompt and padding
     rows are never multiplied by the lm_head.
  3. Per-sequence sums (LD-DPO: tokens past the shorter completion of the pair weighted by
     `ld_alpha`) and completion lengths.
  4. The reference: hidden states through the same primitive under `torch.no_grad()` (nothing is
     saved: the reference log-probs have no grad_fn), or precomputed per-sequence log-probs, or
     none (reference-free losses).
  5. The loss function of `flashloss.preference` for the loss type, with the sums and lengths.
So the fused and the unfused path share the loss math by construction; only where the per-token
log-probs come from differs (DESIGN.md §8: "loss math that differs between a fused and an
unfused path" is what this avoids).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import preference as P
from ._validate import FLOAT_DTYPES, check_reduction, check_tensor
from .ops.token_logprobs import _shifted_targets, token_logprobs

__all__ = ["FusedLinearPreferenceLoss", "CPO_FAMILY", "DPO_FAMILY"]

DPO_FAMILY = tuple(P.LOSS_TYPES) + tuple(P.LOSS_TYPE_ALIASES)
# name accepted by the module -> cpo_loss loss_type ("cpo" is CPOTrainer's default sigmoid loss)
CPO_FAMILY = {"cpo": "sigmoid", "cpo_sigmoid": "sigmoid", "cpo_hinge": "hinge", "cpo_ipo": "ipo",
              "simpo": "simpo", "alphapo": "simpo"}
# nll_weight=None means the family's own default: TRL CPOTrainer cpo_alpha = 1.0 for CPO, 0 for
# SimPO / AlphaPO (flashloss simpo_loss, TRL alphapo), 1 for ORPO (its NLL term), none for DPO.
_DEFAULT_NLL = {"cpo": 1.0, "cpo_sigmoid": 1.0, "cpo_hinge": 1.0, "cpo_ipo": 1.0, "simpo": 0.0, "alphapo": 0.0,
                "orpo": 1.0}
# loss-function arguments the module forms itself
_COMPUTED = {"chosen_lengths": "labels", "rejected_lengths": "labels", "chosen_nll": "nll_weight",
             "rpo_alpha": "nll_weight", "cpo_alpha": "nll_weight", "wpo_weights": "use_weighting",
             "loss_type": "loss_type"}


def _family(loss_type) -> tuple[str, object]:
    if isinstance(loss_type, str) and (loss_type in CPO_FAMILY or loss_type == "orpo"):
        return ("orpo" if loss_type == "orpo" else "cpo"), loss_type
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type) if isinstance(loss_type, (list, tuple)) \
        else None
    if names and any(n in CPO_FAMILY or n == "orpo" for n in names):
        raise ValueError(f"{sorted(set(CPO_FAMILY) | {'orpo'})} are single loss types (reference-free families); "
                         f"they cannot be combined in a list, got {loss_type!r}")
    P._loss_types(loss_type)  # raises on unknown names
    return "dpo", loss_type


class FusedLinearPreferenceLoss(torch.nn.Module):
    """Preference loss from hidden states and the lm_head weight through primitive B.

    Constructor:
      loss_type      a DPO-family name of TRL `DPOTrainer` or a list of them (`preference_loss`:
                     sigmoid, cdpo, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
                     aot_unpaired/aot_pair, apo_zero, apo_down, discopop, sft, sigmoid_norm), or one of
                     the reference-free families: "cpo" (= "cpo_sigmoid"), "cpo_hinge", "cpo_ipo",
                     "simpo", "alphapo" (`cpo_loss`; alphapo needs alpha=... in the keyword arguments)
                     and "orpo" (`orpo_loss`).
      beta, label_smoothing, convention, loss_weights, reduction, backend: as `preference_loss`
                     (convention and loss_weights: DPO family only; ORPO takes no smoothing).
      ignore_index   label value of prompt and padding tokens (-100).
      nll_weight     weight of the token-mean NLL of the chosen completion tokens: RPO's rpo_alpha
                     (DPO family, default None = off), CPO's cpo_alpha (default 1.0 for cpo*, 0 for
                     simpo/alphapo, as TRL), ORPO's NLL term (default 1.0). The NLL counts completion
                     tokens only (Liger's `nll_scope="completion"`; TRL's ORPO also counts the prompt,
                     which would send prompt tokens through the lm_head).
      ld_alpha       LD-DPO (OBJECTIVES §3.3, DPO family): with n_p = min(n_w, n_l), completion tokens
                     at positions <= n_p count 1, later ones ld_alpha, in both sequences of the pair;
                     applied to the policy and to a reference given as hidden states (TRL 1.x), to
                     the policy only under convention="trl_legacy". Precomputed reference log-probs
                     are used as given. The sft / RPO NLL uses the unweighted log-probs.
      use_weighting  WPO (DPO family): per sequence w = exp(mean_t(logp_t - log sum_v p_v^2)) under
                     no grad (primitive B's log_sum_p2), the pair's loss times w_w w_l.
      temperature, logit_scale, softcap: the logit map of primitive B (OBJECTIVES §2.1), also used
                     for a reference given as hidden states.
      token_metrics  compute logits/chosen, logits/rejected and entropy (default True; False drops
                     the entropy and z_sum outputs from the primitive's forward).
      **loss_kwargs  passed to the loss function (f_divergence_type, f_alpha_divergence_coef,
                     discopop_tau, dpop_lambda, rdpo_alpha, bco_state, update_bco_state; simpo_gamma,
                     alpha for the CPO family). Lengths, NLL, RPO/CPO alpha and WPO weights are formed
                     here and may not be passed.

    forward(hidden, weight, labels, bias=None, *, rejected_hidden=None, rejected_labels=None,
            ref_hidden=None, ref_weight=None, ref_bias=None, ref_chosen_logps=None,
            ref_rejected_logps=None, shift=True) -> (loss, metrics)
      hidden [2B, T, H] with the B chosen rows first, then the B rejected rows (TRL's concatenated
      batch) and labels [2B, T]; or chosen hidden [B, T, H] + labels [B, T] with rejected_hidden
      [B, T', H] + rejected_labels [B, T']. weight [V, H], bias [V] or None. Labels hold the token ids
      of the completion and ignore_index on prompt and padding tokens; shift=True scores position t
      on labels[t + 1] (causal LM), shift=False scores each position on its own label.
      Reference (DPO family only): ref_hidden in the layout of the policy (a [2B, T, H] tensor, or a
      (chosen, rejected) pair of tensors when the policy is given separately) with ref_weight /
      ref_bias (default: the policy's weight and bias, detached), run with no grad; or
      ref_chosen_logps / ref_rejected_logps [B] (summed log-probs, detached); or neither
      (reference-free).
      Returns the loss (reduced per `reduction`) and a dict of detached metrics: those of the loss
      function (rewards/*, logps/chosen, logps/rejected, nll_loss, ...) plus, with token_metrics,
      logits/chosen, logits/rejected (token mean over completion tokens of the vocabulary-mean logit
      z_sum / V) and entropy (token mean over the completion tokens of both sequences).
      TRL's mean_token_accuracy is not given: it needs an argmax output that primitive B does not
      have yet.
    """

    def __init__(self, loss_type: Union[str, Sequence[str]] = "sigmoid", beta=0.1, *, label_smoothing: float = 0.0,
                 convention: str = "trl", loss_weights: Optional[Sequence[float]] = None, ignore_index: int = -100,
                 nll_weight: Optional[float] = None, ld_alpha: Optional[float] = None, use_weighting: bool = False,
                 temperature: float = 1.0, logit_scale: float = 1.0, softcap: Optional[float] = None,
                 reduction: str = "mean", backend: str = "auto", token_metrics: bool = True, **loss_kwargs):
        super().__init__()
        self.family, self.loss_type = _family(loss_type)
        if convention not in P.CONVENTIONS:
            raise ValueError(f"convention must be one of {P.CONVENTIONS}, got {convention!r}")
        check_reduction(reduction)
        P._check_backend(backend)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        for k in loss_kwargs:
            if k in _COMPUTED:
                raise TypeError(f"{k} is formed by FusedLinearPreferenceLoss (from {_COMPUTED[k]}); do not pass it")
        if self.family != "dpo":
            for name, val, off in (("loss_weights", loss_weights, None), ("ld_alpha", ld_alpha, None),
                                   ("use_weighting", use_weighting, False)):
                if val is not off:
                    raise ValueError(f"{name} applies to the DPO family only, not to loss_type {loss_type!r}")
            if self.loss_type == "alphapo" and "alpha" not in loss_kwargs:
                raise ValueError("loss_type 'alphapo' needs alpha=... (AlphaPO's alpha has no default)")
            if self.family == "orpo" and label_smoothing:
                raise ValueError("ORPO has no label smoothing")
        if nll_weight is None:
            nll_weight = _DEFAULT_NLL.get(self.loss_type if isinstance(self.loss_type, str) else "", 0.0)
        self.nll_weight = P._float_arg("nll_weight", nll_weight)
        self.ld_alpha = None if ld_alpha is None else P._float_arg("ld_alpha", ld_alpha, 0.0, 1.0)
        if not isinstance(use_weighting, bool):
            raise TypeError(f"use_weighting must be a bool, got {type(use_weighting).__name__}")
        self.use_weighting = use_weighting
        self.beta, self.label_smoothing, self.convention = beta, label_smoothing, convention
        self.loss_weights, self.ignore_index, self.reduction, self.backend = loss_weights, ignore_index, reduction, \
            backend
        self.temperature, self.logit_scale, self.softcap = temperature, logit_scale, softcap
        self.token_metrics = bool(token_metrics)
        self.loss_kwargs = loss_kwargs

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, beta={self.beta}, backend={self.backend!r}"

    # ---------------------------------------------------------------------------------------
    # per-token statistics of both sequences through primitive B, one call

    def _targets(self, hidden, labels, name: str, shift: bool):
        check_tensor(name, hidden, dim=3, dtypes=FLOAT_DTYPES)
        lname = "labels" if name == "hidden" else name.replace("hidden", "labels")
        check_tensor(lname, labels, dim=2, dtypes=(torch.int64, torch.int32), device=hidden.device)
        if tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"{lname} must have shape {list(hidden.shape[:2])} (the leading dimensions of {name}), "
                             f"got {list(labels.shape)}")
        labels = labels.long()
        return _shifted_targets(labels, self.ignore_index, None) if shift else labels

    def _token_stats(self, parts, weight, bias, outputs):
        """parts: [(hidden [B, T, H], targets [B, T])]; returns {output: [per-part [B, T] tensors]}.
        Only scored rows go through the lm_head: they are gathered from every part into one block."""
        h = weight.shape[1]
        if torch.compiler.is_compiling():
            # The gather of scored rows has a data-dependent size; inside torch.compile every row
            # goes through the primitive, which gives ignored rows 0 and no gradient in place
            # (the same numbers; prompt and padding rows then cost lm_head work).
            x = torch.cat([hid.reshape(-1, h) for hid, _ in parts])
            t = torch.cat([tgt.reshape(-1) for _, tgt in parts])
            stats = token_logprobs(x, weight, t, bias, ignore_index=self.ignore_index, temperature=self.temperature,
                                   logit_scale=self.logit_scale, softcap=self.softcap, outputs=outputs,
                                   backend=self.backend)
            counts = [tgt.numel() for _, tgt in parts]
            return {o: [v.view(tgt.shape) for v, (_, tgt) in zip(getattr(stats, o).split(counts), parts)]
                    for o in outputs}
        idx, rows, tgts = [], [], []
        for hid, tgt in parts:
            flat = tgt.reshape(-1)
            i = (flat != self.ignore_index).nonzero().squeeze(1)
            idx.append(i)
            rows.append(hid.reshape(-1, h).index_select(0, i))
            tgts.append(flat.index_select(0, i))
        x = rows[0] if len(rows) == 1 else torch.cat(rows)
        t = tgts[0] if len(tgts) == 1 else torch.cat(tgts)
        stats = token_logprobs(x, weight, t, bias, ignore_index=self.ignore_index, temperature=self.temperature,
                               logit_scale=self.logit_scale, softcap=self.softcap, outputs=outputs,
                               backend=self.backend)
        counts = [int(i.numel()) for i in idx]
        out = {}
        for o in outputs:
            vals = getattr(stats, o)
            pieces = vals.split(counts) if len(counts) > 1 else (vals,)
            out[o] = [v.new_zeros(tgt.numel()).index_copy(0, i, v).view(tgt.shape)
                      for v, i, (_, tgt) in zip(pieces, idx, parts)]
        return out

    @staticmethod
    def _split(per_part):
        """[chosen, rejected] from one stacked [2B, T] tensor or two parts."""
        return list(per_part[0].chunk(2)) if len(per_part) == 1 else list(per_part)

    def _sums(self, logp, scored, lengths):
        """Per-sequence sums [B] of chosen and rejected, LD-DPO-weighted when ld_alpha is set."""
        if self.ld_alpha is None:
            return [lp.sum(1) for lp in logp]
        shared = torch.minimum(lengths[0], lengths[1])[:, None]
        out = []
        for lp, sc in zip(logp, scored):
            pos = sc.cumsum(1)
            w = torch.where(pos <= shared, 1.0, self.ld_alpha).to(lp.dtype)
            out.append((lp * w).sum(1))
        return out

    # ---------------------------------------------------------------------------------------

    def forward(self, hidden, weight, labels, bias=None, *, rejected_hidden=None, rejected_labels=None,
                ref_hidden=None, ref_weight=None, ref_bias=None, ref_chosen_logps=None, ref_rejected_logps=None,
                shift: bool = True):
        check_tensor("weight", weight, dim=2, dtypes=FLOAT_DTYPES)
        if (rejected_hidden is None) != (rejected_labels is None):
            raise ValueError("give rejected_hidden and rejected_labels together (or stack chosen and rejected in "
                             "hidden and labels)")
        if rejected_hidden is None:
            tg = self._targets(hidden, labels, "hidden", shift)
            if hidden.shape[0] % 2:
                raise ValueError(f"hidden must stack B chosen then B rejected sequences ([2B, T, H]); got an odd "
                                 f"first dimension {hidden.shape[0]} (or pass rejected_hidden)")
            parts = [(hidden, tg)]
        else:
            tg_c = self._targets(hidden, labels, "hidden", shift)
            tg_r = self._targets(rejected_hidden, rejected_labels, "rejected_hidden", shift)
            if rejected_hidden.shape[0] != hidden.shape[0]:
                raise ValueError(f"rejected_hidden must have B={hidden.shape[0]} sequences like hidden, got "
                                 f"{rejected_hidden.shape[0]}")
            parts = [(hidden, tg_c), (rejected_hidden, tg_r)]

        for pname, (hid, _) in zip(("hidden", "rejected_hidden"), parts):
            if hid.shape[-1] != weight.shape[1]:  # (a reshape to weight's H would silently mix rows)
                raise ValueError(f"weight must have shape [V, H={hid.shape[-1]}] (H from {pname}'s last dimension), "
                                 f"got {list(weight.shape)}")
        outputs = ("logp",)
        if self.token_metrics:
            outputs += ("entropy", "z_sum")
        if self.use_weighting:
            outputs += ("log_sum_p2",)
        stats = self._token_stats(parts, weight, bias, outputs)
        logp = self._split(stats["logp"])
        scored = self._split([(t != self.ignore_index) for _, t in parts])
        lengths = [s.sum(1) for s in scored]
        sums = self._sums(logp, scored, lengths)
        n_chosen = lengths[0].sum().clamp_min(1).to(logp[0].dtype)
        nll = -logp[0].sum() / n_chosen  # token-mean NLL of the chosen completion tokens (no LD weighting)

        ref = self._reference(parts, weight, bias, ref_hidden, ref_weight, ref_bias, ref_chosen_logps,
                              ref_rejected_logps, scored, lengths, shift)
        loss, metrics = self._loss(sums, lengths, ref, nll, stats, scored)

        if self.token_metrics:
            with torch.no_grad():
                v = weight.shape[0]
                ent = self._split(stats["entropy"])
                zs = self._split(stats["z_sum"])
                for key, z, sc, n in zip(("logits/chosen", "logits/rejected"), zs, scored, lengths):
                    metrics[key] = (z.detach() * sc).sum() / (n.sum().clamp_min(1) * v)
                n_all = (lengths[0].sum() + lengths[1].sum()).clamp_min(1)
                metrics["entropy"] = (ent[0].detach().sum() + ent[1].detach().sum()) / n_all
        return loss, metrics

    def _reference(self, parts, weight, bias, ref_hidden, ref_weight, ref_bias, ref_chosen, ref_rejected, scored,
                   lengths, shift):
        given_logps = ref_chosen is not None or ref_rejected is not None
        if ref_hidden is None:
            if ref_weight is not None or ref_bias is not None:
                raise ValueError("ref_weight / ref_bias need ref_hidden")
        elif given_logps:
            raise ValueError("give the reference as ref_hidden (+ ref_weight) or as ref_chosen_logps / "
                             "ref_rejected_logps, not both")
        if self.family != "dpo" and (ref_hidden is not None or given_logps):
            raise ValueError(f"loss_type {self.loss_type!r} is reference-free: do not pass a reference")
        if given_logps:
            if ref_chosen is None or ref_rejected is None:
                raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither")
            return ref_chosen.detach(), ref_rejected.detach()
        if ref_hidden is None:
            return None
        if ref_weight is None:
            ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
        if isinstance(ref_hidden, (tuple, list)):
            if len(ref_hidden) != 2:
                raise ValueError("ref_hidden must be a tensor or a (chosen, rejected) pair of tensors")
            ref_parts_h = list(ref_hidden)
        elif len(parts) == 2:
            ref_parts_h = list(ref_hidden.chunk(2)) if ref_hidden.dim() == 3 and ref_hidden.shape[0] % 2 == 0 else \
                [ref_hidden]
        else:
            ref_parts_h = [ref_hidden]
        if len(ref_parts_h) != len(parts):
            raise ValueError("ref_hidden must have the layout of the policy's hidden states")
        for rh, (ph, _) in zip(ref_parts_h, parts):
            check_tensor("ref_hidden", rh, dim=3, dtypes=FLOAT_DTYPES)
            if rh.shape[-1] != ref_weight.shape[-1]:
                raise ValueError(f"ref_hidden must have the hidden size H={ref_weight.shape[-1]} of ref_weight "
                                 f"{list(ref_weight.shape)}, got shape {list(rh.shape)}")
            if tuple(rh.shape[:2]) != tuple(ph.shape[:2]):
                raise ValueError(f"ref_hidden must have the leading shape {list(ph.shape[:2])} of the policy's "
                                 f"hidden states, got {list(rh.shape[:2])}")
        with torch.no_grad():  # forward-only reference: no autograd node, nothing saved
            rstats = self._token_stats([(rh.detach(), t) for rh, (_, t) in zip(ref_parts_h, parts)],
                                       ref_weight.detach(), None if ref_bias is None else ref_bias.detach(), ("logp",))
            rlogp = self._split(rstats["logp"])
            if self.ld_alpha is not None and self.convention == "trl_legacy":
                return tuple(lp.sum(1) for lp in rlogp)  # legacy LD-DPO: policy only
            return tuple(self._sums(rlogp, scored, lengths))

    def _loss(self, sums, lengths, ref, nll, stats, scored):
        pc, pr = sums
        nw, nl = lengths
        kw = dict(self.loss_kwargs)
        common = dict(beta=self.beta, reduction=self.reduction, backend=self.backend)
        if self.family == "dpo":
            rc, rr = ref if ref is not None else (None, None)
            wpo = None
            if self.use_weighting:
                with torch.no_grad():
                    lp2 = self._split(stats["log_sum_p2"])
                    logp = self._split(stats["logp"])
                    wpo = tuple(torch.exp(((lp.detach() - q) * sc).sum(1) / n.clamp_min(1))
                                for lp, q, sc, n in zip(logp, lp2, scored, lengths))
            return P.preference_loss(pc, pr, rc, rr, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                                     convention=self.convention, chosen_lengths=nw, rejected_lengths=nl,
                                     loss_weights=self.loss_weights, chosen_nll=nll,
                                     rpo_alpha=self.nll_weight if self.nll_weight else None, wpo_weights=wpo,
                                     **common, **kw)
        if self.family == "cpo":
            return P.cpo_loss(pc, pr, nll if self.nll_weight else None, loss_type=CPO_FAMILY[self.loss_type],
                              cpo_alpha=self.nll_weight, label_smoothing=self.label_smoothing, chosen_lengths=nw,
                              rejected_lengths=nl, **common, **kw)
        w = self.nll_weight
        loss, metrics = P.orpo_loss(pc, pr, (nll * w) if w else None, chosen_lengths=nw, rejected_lengths=nl,
                                    **common, **kw)
        if w:
            metrics["nll_loss"] = nll.detach()
        return loss, metrics
