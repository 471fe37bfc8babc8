"""Input-validation audit of every public function (issue #9, item 4).

BAD_INPUTS is one table of rows (function name, bad keyword arguments, expected exception type,
message regex). Each row calls the function with a valid base call (BASE[name], small CPU
tensors) in which the given keyword arguments are replaced; it must raise the given type with a
message that names the argument and says what was expected (never a NaN, a segfault or an error
from deep inside torch). Column by column:
  function   the public name (flashloss.<name>, or a module's forward for the classes)
  bad        keyword arguments replacing the valid ones; META(x) moves x to the 'meta' device to
             stand for a second device
  exc        TypeError (wrong type or dtype), ValueError (wrong shape, value or device),
             IndexError (an index out of range: targets, labels, dataset index)
  match      a regex the message must match: the argument's name and the expectation
Categories covered per function: wrong shapes, wrong dtypes, mismatched devices, out-of-range
indices, bad scalars (scale, temperature, beta, reduction).

Inputs that are valid but unusual must WORK and give the contiguous result (tests below): non-
contiguous (strided views) and expanded (stride-0) inputs for every case of tests/family_cases.py,
inputs that do not require grad (no graph, same values), and the contrastive scale given as a
Python float, a 0-d tensor or an [N] tensor (same numbers; a gradient when it requires grad).
"""
from __future__ import annotations

import pytest
import torch

import flashloss
from family_cases import CASES, flatten

N, D, V, H = 4, 3, 7, 5


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + 1), dtype=dtype)


def META(x):
    return x.to("meta")


q, k = _t(N, D), _t(N, D)
hid, w = _t(N, H), _t(V, H)
tgt = torch.tensor([0, 3, 6, -100])
lp4 = [_t(N) - 5 for _ in range(4)]
LAB = torch.tensor([0, 1, 0, 1])

# valid base calls (keyword arguments)
BASE = {
    "contrastive_lse": dict(q=q, k=k, scale=2.0, targets=torch.arange(N)),
    "row_logsumexp": dict(x=_t(2, 9)),
    "token_logprobs": dict(hidden=hid, weight=w, targets=tgt),
    "logprobs_from_logits": dict(logits=_t(N, V), targets=tgt),
    "sequence_logprobs": dict(hidden=_t(2, 3, H), weight=w, labels=torch.tensor([[1, 2, 3], [4, 5, -100]])),
    "linear_cross_entropy": dict(hidden=hid, weight=w, targets=tgt),
    "focal_loss": dict(hidden=hid, weight=w, targets=tgt),
    "vocab_kl": dict(student_hidden=hid, student_weight=w, teacher_hidden=_t(N, H), teacher_weight=_t(V, H),
                     targets=tgt),
    "info_nce": dict(q=q, k=k),
    "margin_nce": dict(q=q, k=k),
    "moco_loss": dict(q=q, k_pos=k, queue=_t(6, D)),
    "mnrl_loss": dict(anchors=q, positives=k),
    "clip_loss": dict(image_features=q, text_features=k, logit_scale=torch.tensor(2.0)),
    "siglip_loss": dict(image_features=q, text_features=k, logit_scale=torch.tensor(2.0),
                        logit_bias=torch.tensor(-1.0)),
    "nt_xent": dict(z1=q, z2=k),
    "supcon_loss": dict(embeddings=q, labels=LAB),
    "dcl_loss": dict(z1=q, z2=k),
    "debiased_contrastive_loss": dict(z1=q, z2=k),
    "hard_negative_loss": dict(z1=q, z2=k),
    "align_uniform_loss": dict(x=q, y=k),
    "soft_target_nce": dict(q=q, k=k, target_weights=_t(N, N).abs()),
    "hard_negative_nce": dict(q=q, k=k, num_negatives=2),
    "dexml_loss": dict(q=q, k=k, positives=torch.tensor([[0, 1], [2, -1], [3, -1], [1, 2]])),
    "isogclr_loss": dict(image_features=q, text_features=k, tau_image=torch.full((N,), 0.1),
                         tau_text=torch.full((N,), 0.1)),
    "distill_clip_loss": dict(image_features=q, text_features=k, logit_scale=2.0, dist_image_features=_t(N, 2),
                              dist_text_features=_t(N, 2), dist_logit_scale=3.0),
    "similarity_kl_loss": dict(student_q=q, student_k=k, teacher_q=_t(N, 2), teacher_k=_t(N, 2), student_scale=2.0,
                               teacher_scale=3.0),
    "topk_threshold": dict(q=q, k=k, num_negatives=2),
    "dpo_loss": dict(policy_chosen=lp4[0], policy_rejected=lp4[1]),
    "preference_loss": dict(policy_chosen=lp4[0], policy_rejected=lp4[1], ref_chosen=lp4[2], ref_rejected=lp4[3]),
    "ipo_loss": dict(policy_chosen=lp4[0], policy_rejected=lp4[1], chosen_lengths=torch.tensor([2, 3, 4, 5]),
                     rejected_lengths=torch.tensor([2, 3, 4, 5])),
    "simpo_loss": dict(policy_chosen=lp4[0], policy_rejected=lp4[1]),
    "cpo_loss": dict(policy_chosen=lp4[0], policy_rejected=lp4[1], chosen_nll=torch.tensor(1.5)),
    "alphapo_loss": dict(policy_chosen=lp4[0], policy_rejected=lp4[1], alpha=0.1),
    "orpo_loss": dict(policy_chosen=lp4[0] / 10, policy_rejected=lp4[1] / 10),
    "kto_loss": dict(policy_logps=lp4[0], ref_logps=lp4[1], desirable=LAB.bool(), policy_kl_logps=lp4[2],
                     ref_kl_logps=lp4[3]),
    "bco_loss": dict(policy_logps=lp4[0], ref_logps=lp4[1], desirable=LAB.bool()),
    "npo_loss": dict(policy_logps=lp4[0], ref_logps=lp4[1]),
    "tdpo_loss": dict(policy_chosen=lp4[0], policy_rejected=lp4[1], ref_chosen=lp4[2], ref_rejected=lp4[3],
                      kl_chosen=lp4[0].abs(), kl_rejected=lp4[1].abs()),
    "lipo_lambda_loss": dict(policy_logps=_t(2, 3), labels=torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0]])),
    "plackett_luce_loss": dict(policy_logps=_t(2, 3), labels=torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0]])),
    "bradley_terry_loss": dict(chosen_rewards=lp4[0], rejected_rewards=lp4[1]),
    "FusedLinearPreferenceLoss": dict(hidden=_t(2, 3, H), weight=w, labels=torch.tensor([[1, 2, 3], [4, 5, 6]])),
    "ClipLoss": dict(image_features=q, text_features=k, logit_scale=torch.tensor(2.0)),
    "SigLipLoss": dict(image_features=q, text_features=k, logit_scale=torch.tensor(2.0), logit_bias=torch.tensor(-1.0)),
    "NTXentLoss": dict(embeddings=q, labels=LAB),
    "SupConLoss": dict(embeddings=q, labels=LAB),
    "DistillClipLoss": dict(image_features=q, text_features=k, logit_scale=2.0, dist_image_features=_t(N, 2),
                            dist_text_features=_t(N, 2), dist_logit_scale=3.0),
    "ISogCLRLoss": dict(image_features=q, text_features=k, index=torch.tensor([0, 1, 2, 3])),
    # sorting
    "sort_network": dict(x=_t(3, 5)),
    "DiffSortNet": dict(vectors=_t(3, 5)),
    "permutation_loss": dict(P=torch.eye(5).expand(3, 5, 5), targets=_t(3, 5)),
    "groco_loss": dict(views=[q, k], topk_neg=2),
    "soft_rank": dict(x=_t(3, 5)),
    "spearman_loss": dict(pred=_t(3, 5), target=_t(3, 5)),
    "neural_sort": dict(s=_t(3, 5)),
    "neural_ndcg": dict(scores=_t(2, 4), labels=torch.tensor([[2.0, 0.0, 1.0, 0.0], [1.0, 0.0, -1.0, -1.0]])),
}

_MODULES = {"FusedLinearPreferenceLoss": lambda: flashloss.FusedLinearPreferenceLoss("sigmoid"),
            "ClipLoss": flashloss.ClipLoss, "SigLipLoss": flashloss.SigLipLoss, "NTXentLoss": flashloss.NTXentLoss,
            "SupConLoss": flashloss.SupConLoss, "DistillClipLoss": flashloss.DistillClipLoss,
            "ISogCLRLoss": lambda: flashloss.ISogCLRLoss(8),
            "DiffSortNet": lambda: flashloss.DiffSortNet("odd_even", 5)}


def _call(name, kwargs):
    if name in _MODULES:
        return _MODULES[name]()(**kwargs)
    return getattr(flashloss, name)(**kwargs)


T, V_, I = TypeError, ValueError, IndexError
BAD_INPUTS = [
    # ---- primitive A
    ("contrastive_lse", dict(q=q[0]), V_, r"q must be 2-D"),
    ("contrastive_lse", dict(k=_t(N, D + 1)), V_, r"k must have the same feature dimension"),
    ("contrastive_lse", dict(k=k.double()), T, r"k must have dtype in \(float32\)"),
    ("contrastive_lse", dict(q=q.long()), T, r"q must have dtype"),
    ("contrastive_lse", dict(k=META(k)), V_, r"k must be on device cpu"),
    ("contrastive_lse", dict(scale=-1.0), V_, r"scale must be > 0"),
    ("contrastive_lse", dict(scale=torch.ones(N + 1)), V_, r"scale must be a float, a 0-d tensor or a \[N=4\]"),
    ("contrastive_lse", dict(scale="2"), T, r"scale must be a float or a tensor"),
    ("contrastive_lse", dict(scale=META(torch.tensor(2.0))), V_, r"scale must be on device cpu"),
    ("contrastive_lse", dict(bias=torch.ones(2)), V_, r"bias must be 0-D"),
    ("contrastive_lse", dict(targets=torch.tensor([0, 1, 2, N])), I, r"targets must be in \[0, 4\)"),
    ("contrastive_lse", dict(targets=torch.tensor([0, 1, -5, 2])), I, r"targets must be in \[0, 4\)"),
    ("contrastive_lse", dict(targets=torch.arange(N).float()), T, r"targets must have dtype in \(int64, int32\)"),
    ("contrastive_lse", dict(targets=torch.arange(N + 1)), V_, r"targets must have shape \[N=4\]"),
    ("contrastive_lse", dict(targets=META(torch.arange(N))), V_, r"targets must be on device cpu"),
    ("contrastive_lse", dict(targets=None, labels_q=LAB, labels_k=LAB[:3]), V_, r"labels_k must have shape \[M=4\]"),
    ("contrastive_lse", dict(targets=None, labels_q=LAB), V_, r"labels_q and labels_k go together"),
    ("contrastive_lse", dict(targets=None, labels_q=LAB.float(), labels_k=LAB), T, r"labels_q must have dtype"),
    ("contrastive_lse", dict(margin=torch.ones(N + 1)), V_, r"margin must be a float or a \[N=4\] tensor"),
    ("contrastive_lse", dict(neg_threshold=torch.ones(2)), V_, r"neg_threshold must be a float or a \[N=4\]"),
    ("contrastive_lse", dict(extra_k=_t(3, D + 1)), V_, r"extra_k\[0\] must have feature dimension 3"),
    ("contrastive_lse", dict(outputs=("row_lse", "bogus")), V_, r"outputs must be among"),
    ("contrastive_lse", dict(mode="hinge"), V_, r"mode must be 'softmax' or 'sigmoid'"),
    ("contrastive_lse", dict(backend="gpu"), V_, r"backend"),
    ("row_logsumexp", dict(x=torch.tensor(1.0)), V_, r"x must have at least 1 dimension"),
    ("row_logsumexp", dict(x=torch.ones(2, 3, dtype=torch.int64)), T, r"x must have dtype"),
    # ---- primitive B
    ("token_logprobs", dict(weight=_t(V, H + 1)), V_, r"weight must have shape \[V, H=5\]"),
    ("token_logprobs", dict(weight=w.double()), T, r"weight must have dtype in \(float32\)"),
    ("token_logprobs", dict(weight=META(w)), V_, r"weight must be on device cpu"),
    ("token_logprobs", dict(targets=torch.tensor([0, 3, 7, -100])), I, r"targets must be in \[0, 7\) or ignore_index"),
    ("token_logprobs", dict(targets=tgt[:3]), V_, r"targets must have shape \[4\]"),
    ("token_logprobs", dict(targets=tgt.float()), T, r"targets must have dtype in \(int64, int32\)"),
    ("token_logprobs", dict(bias=torch.zeros(V + 1)), V_, r"bias must have shape \[V=7\]"),
    ("token_logprobs", dict(temperature=0.0), V_, r"temperature must be a finite number > 0"),
    ("token_logprobs", dict(temperature=torch.tensor(1.0)), T, r"temperature must be a Python float"),
    ("token_logprobs", dict(softcap=-1.0), V_, r"softcap must be None or a finite number > 0"),
    ("token_logprobs", dict(outputs=("logp", "logits")), V_, r"outputs must be a non-empty selection"),
    ("token_logprobs", dict(ignore_index=-100.0), T, r"ignore_index must be an int"),
    ("logprobs_from_logits", dict(logits=torch.ones(N, 0)), V_, r"logits must have shape \[\.\.\., V\] with V >= 1"),
    ("logprobs_from_logits", dict(targets=torch.tensor([0, 1, 2, 9])), I, r"targets must be in \[0, 7\)"),
    ("logprobs_from_logits", dict(targets=META(tgt)), V_, r"targets must be on device cpu"),
    ("sequence_logprobs", dict(labels=torch.tensor([[1, 2, 3]])), V_, r"labels must have shape \[2, 3\]"),
    ("sequence_logprobs", dict(labels=torch.tensor([[1, 2, 9], [4, 5, -100]])), I, r"targets must be in \[0, 7\)"),
    ("sequence_logprobs", dict(weight=None), V_, r"needs hidden and weight"),
    ("sequence_logprobs", dict(cu_seqlens=torch.tensor([0, 2])), V_, r"hidden must be 2-D"),
    ("linear_cross_entropy", dict(reduction="avg"), V_, r"reduction must be one of"),
    ("linear_cross_entropy", dict(label_smoothing=1.5), V_, r"label_smoothing"),
    ("linear_cross_entropy", dict(class_weight=torch.ones(V + 1)), V_, r"class_weight"),
    ("linear_cross_entropy", dict(token_weights=torch.ones(N + 1)), V_, r"token_weights"),
    ("linear_cross_entropy", dict(targets=META(tgt)), V_, r"targets must be on device cpu"),
    ("focal_loss", dict(gamma=-1.0), V_, r"gamma"),
    ("focal_loss", dict(alpha=torch.ones(V + 2)), V_, r"alpha"),
    ("vocab_kl", dict(teacher_weight=_t(V + 1, H)), V_, r"teacher_weight"),
    ("vocab_kl", dict(teacher_hidden=_t(N + 1, H)), V_, r"teacher_hidden"),
    ("vocab_kl", dict(divergence="tv"), V_, r"divergence"),
    ("vocab_kl", dict(teacher_hidden=META(_t(N, H))), V_, r"teacher_hidden must be on device cpu"),
    # ---- contrastive objectives
    ("info_nce", dict(k=_t(N - 1, D)), V_, r"targets default to arange\(N\) and need M >= N"),
    ("info_nce", dict(temperature=0.0), V_, r"temperature must be > 0"),
    ("info_nce", dict(scale=2.0, temperature=0.5), V_, r"give scale or temperature"),
    ("info_nce", dict(targets=torch.tensor([0, 1, 2, 5])), I, r"targets must be in \[0, 4\)"),
    ("info_nce", dict(k=META(k)), V_, r"k must be on device cpu"),
    ("margin_nce", dict(kind="cosine"), V_, r"kind must be 'additive' or 'angular'"),
    ("moco_loss", dict(k_pos=_t(N + 1, D)), V_, r"k_pos must have the shape of q"),
    ("mnrl_loss", dict(positives=_t(N, D + 1)), V_, r"k must have the same feature dimension|feature"),
    ("clip_loss", dict(text_features=_t(N + 1, D)), V_, r"image_features and text_features must have one shape"),
    ("clip_loss", dict(logit_scale=torch.ones(2)), V_, r"scale must be a float, a 0-d tensor or a \[N=4\]"),
    ("clip_loss", dict(logit_scale=META(torch.tensor(2.0))), V_, r"scale must be on device cpu"),
    ("clip_loss", dict(reduction="avg"), V_, r"reduction must be one of"),
    ("siglip_loss", dict(text_features=_t(N - 1, D)), V_, r"image_features and text_features must have as many rows"),
    ("siglip_loss", dict(logit_bias=torch.ones(3)), V_, r"bias must be 0-D"),
    ("nt_xent", dict(z2=_t(N + 1, D)), V_, r"z1 and z2 must have one shape"),
    ("nt_xent", dict(z2=None), V_, r"nt_xent needs a second view z2 or labels"),
    ("nt_xent", dict(z2=None, labels=LAB[:3]), V_, r"labels must be a \[N=4\] tensor"),
    ("supcon_loss", dict(labels=LAB[:2]), V_, r"labels must be a \[N=4\] tensor"),
    ("supcon_loss", dict(no_positive="drop"), V_, r"no_positive must be 'exclude' or 'zero'"),
    ("supcon_loss", dict(labels=LAB.float()), T, r"labels_q must have dtype in \(int64, int32\)"),
    ("dcl_loss", dict(negatives="both"), V_, r"negatives must be 'joint' or 'split'"),
    ("dcl_loss", dict(z2=_t(N, D + 1)), V_, r"z1 and z2 must have one shape"),
    ("debiased_contrastive_loss", dict(tau_plus=1.0), V_, r"tau_plus must be in \[0, 1\)"),
    ("hard_negative_loss", dict(z1=q[:1], z2=k[:1]), V_, r"at least 2 pairs"),
    ("align_uniform_loss", dict(reduction="none"), V_, r"align_uniform_loss supports reduction='mean' only"),
    ("align_uniform_loss", dict(y=_t(N + 1, D)), V_, r"x and y must have one shape"),
    ("soft_target_nce", dict(target_weights=_t(N, N + 1)), V_, r"target_weights must have shape \[N, M\]"),
    ("soft_target_nce", dict(target_weights=None), V_, r"give exactly one of target_weights or target_embeddings"),
    ("hard_negative_nce", dict(num_negatives=None), V_, r"give num_negatives \(top-k\) and/or min_similarity"),
    ("hard_negative_nce", dict(num_negatives=0), V_, r"num_negatives must be an int >= 1"),
    ("topk_threshold", dict(num_negatives=1.5), V_, r"num_negatives must be an int >= 1"),
    ("dexml_loss", dict(positives=torch.tensor([[0, 0], [1, -1], [2, -1], [3, -1]])), V_, r"positive"),
    ("dexml_loss", dict(positives=torch.tensor([[0, 9], [1, -1], [2, -1], [3, -1]])), I, r"targets must be in"),
    ("isogclr_loss", dict(tau_image=torch.full((N + 1,), 0.1)), V_, r"tau_image must be a \[N=4\] tensor"),
    ("isogclr_loss", dict(image_features=q[:1], text_features=k[:1], tau_image=torch.full((1,), 0.1),
                          tau_text=torch.full((1,), 0.1)), V_, r"at least 2 pairs"),
    ("distill_clip_loss", dict(dist_image_features=_t(N + 1, 2)), V_, r"dist_image_features and dist_text_features"),
    ("similarity_kl_loss", dict(teacher_q=_t(N + 1, 2)), V_, r"student_q and teacher_q must be \[N, D\]"),
    ("ISogCLRLoss", dict(index=torch.tensor([0, 1, 2, 8])), I, r"index must be in \[0, 8\)"),
    ("ISogCLRLoss", dict(index=torch.tensor([0, 1])), V_, r"index must be an int tensor \[N=4\]"),
    ("ClipLoss", dict(text_features=_t(N + 1, D)), V_, r"image_features and text_features must have one shape"),
    ("SigLipLoss", dict(logit_bias=torch.ones(2)), V_, r"bias must be 0-D"),
    ("NTXentLoss", dict(labels=LAB[:3]), V_, r"labels must be a \[N=4\] tensor"),
    ("SupConLoss", dict(labels=LAB[:3]), V_, r"labels must be a \[N=4\] tensor"),
    ("DistillClipLoss", dict(text_features=_t(N + 1, D)), V_, r"image_features and text_features must be \[N, D\]"),
    # ---- preference
    ("dpo_loss", dict(policy_chosen=[1.0, 2.0]), T, r"policy_chosen must be a torch.Tensor"),
    ("preference_loss", dict(policy_rejected=_t(N + 1)), V_, r"policy_rejected must have shape \[4\]"),
    ("preference_loss", dict(policy_chosen=_t(N, 2)), V_, r"policy_chosen must be 1-D"),
    ("preference_loss", dict(policy_rejected=torch.ones(N, dtype=torch.long)), T, r"policy_rejected must be a floating"),
    ("preference_loss", dict(ref_rejected=None), V_, r"give both ref_chosen and ref_rejected"),
    ("preference_loss", dict(ref_chosen=META(lp4[2])), V_, r"ref_chosen must be on device cpu"),
    ("preference_loss", dict(loss_type="dpo"), V_, r"loss_type"),
    ("preference_loss", dict(beta=-0.1), V_, r"beta must be > 0"),
    ("preference_loss", dict(beta=torch.ones(3)), V_, r"beta must be a float, a 0-d tensor or a per-item \[B=4\]"),
    ("preference_loss", dict(label_smoothing=0.7), V_, r"label_smoothing"),
    ("preference_loss", dict(reduction="avg"), V_, r"reduction must be one of"),
    ("preference_loss", dict(backend="fast"), V_, r"backend"),
    ("ipo_loss", dict(chosen_lengths=torch.tensor([1, 2])), V_, r"chosen_lengths must have shape \[4\]"),
    ("ipo_loss", dict(chosen_lengths=torch.ones(N, dtype=torch.bool)), T, r"chosen_lengths must hold token counts"),
    ("simpo_loss", dict(policy_rejected=META(lp4[1])), V_, r"policy_rejected must be on device cpu"),
    ("cpo_loss", dict(chosen_nll=torch.ones(3)), V_, r"chosen_nll must be a 0-d tensor or have shape \[B=4\]"),
    ("cpo_loss", dict(loss_type="kto"), V_, r"loss_type"),
    ("alphapo_loss", dict(alpha="x"), T, r"alpha must be a float"),
    ("orpo_loss", dict(policy_chosen=_t(N, 1)), V_, r"policy_chosen must be 1-D"),
    ("kto_loss", dict(desirable=LAB), T, r"desirable must be a bool tensor"),
    ("kto_loss", dict(desirable=LAB.bool()[:3]), V_, r"desirable must have shape \[4\]"),
    ("kto_loss", dict(loss_type="sigmoid"), V_, r"unknown loss_type 'sigmoid' for kto_loss"),
    ("kto_loss", dict(policy_kl_logps=None, ref_kl_logps=None), V_, r"needs the KL batch"),
    ("bco_loss", dict(state=0.5), T, r"state must be a flashloss.preference.RunningMean"),
    ("bco_loss", dict(ref_logps=META(lp4[1])), V_, r"ref_logps must be on device cpu"),
    ("npo_loss", dict(retain_nll=torch.ones(2), retain_kl=torch.ones(2)), V_, r"give retain_nll or retain_kl"),
    ("npo_loss", dict(retain_nll=torch.ones(2)), V_, r"retain_nll must be 0-D"),
    ("tdpo_loss", dict(kl_chosen=_t(N + 1)), V_, r"kl_chosen must have shape \[4\]"),
    ("tdpo_loss", dict(version=3), V_, r"version"),
    ("lipo_lambda_loss", dict(labels=None), V_, r"lipo_lambda_loss needs labels \[L, K\]"),
    ("lipo_lambda_loss", dict(labels=torch.ones(2, 4)), V_, r"labels must have shape \[2, 3\]"),
    ("plackett_luce_loss", dict(mask=torch.ones(2, 3)), T, r"mask must be a bool tensor"),
    ("bradley_terry_loss", dict(margin=torch.ones(3)), V_, r"margin must be a 0-d tensor or have shape \[B=4\]"),
    ("bradley_terry_loss", dict(rejected_rewards=META(lp4[1])), V_, r"rejected_rewards must be on device cpu"),
    ("FusedLinearPreferenceLoss", dict(hidden=_t(3, 3, H), labels=torch.ones(3, 3, dtype=torch.long)), V_,
     r"hidden must stack B chosen then B rejected sequences"),
    ("FusedLinearPreferenceLoss", dict(labels=torch.tensor([[1, 2], [4, 5]])), V_, r"labels must have shape \[2, 3\]"),
    ("FusedLinearPreferenceLoss", dict(labels=torch.tensor([[1, 2, 9], [4, 5, 6]])), I, r"targets must be in \[0, 7\)"),
    ("FusedLinearPreferenceLoss", dict(weight=_t(V, H + 1)), V_, r"weight must have shape \[V, H=5\]"),
    ("FusedLinearPreferenceLoss", dict(weight=META(w)), V_, r"weight must be on device cpu"),
    ("FusedLinearPreferenceLoss", dict(ref_hidden=_t(2, 3, H + 1)), V_, r"ref_hidden must have the hidden size H=5"),
    ("FusedLinearPreferenceLoss", dict(ref_chosen_logps=_t(1)), V_, r"give both ref_chosen_logps and ref_rejected_logps"),
    # ---- sorting (primitive C)
    ("sort_network", dict(x=_t(3, 5).long()), T, r"x must have dtype"),
    ("sort_network", dict(x=_t(3, 0)), V_, r"x must have shape \[\.\.\., n\] with n >= 1"),
    ("sort_network", dict(network="merge"), V_, r"network must be one of"),
    ("sort_network", dict(relaxation="softmax"), V_, r"relaxation must be one of"),
    ("sort_network", dict(padding="zeros"), V_, r"padding must be one of"),
    ("sort_network", dict(steepness=0.0), V_, r"steepness must be a finite number > 0"),
    ("sort_network", dict(steepness=torch.tensor(3.0)), T, r"steepness must be a Python float"),
    ("sort_network", dict(art_lambda=-1.0), V_, r"art_lambda must be a finite number >= 0"),
    ("sort_network", dict(position_weights=_t(4, 2)), V_, r"position_weights must have shape \[n, g\]"),
    ("sort_network", dict(position_weights=META(_t(5, 2))), V_, r"position_weights must be on device cpu"),
    ("DiffSortNet", dict(vectors=_t(3, 6)), V_, r"DiffSortNet\(size=5\) sorts the last dimension, which must be 5"),
    ("DiffSortNet", dict(vectors=_t(3, 5).long()), T, r"vectors must have dtype"),
    ("permutation_loss", dict(targets=_t(3, 4)), V_, r"targets \[\.\.\., n\] with the same leading dimensions"),
    ("permutation_loss", dict(P=torch.eye(5).expand(3, 5, 5).long()), T, r"P must have dtype"),
    ("permutation_loss", dict(reduction="avg"), V_, r"reduction must be"),
    ("groco_loss", dict(views=[q]), V_, r"groco_loss needs at least 2 views"),
    ("groco_loss", dict(views=[q, _t(N, D + 1)]), V_, r"every view must have the shape of views\[0\]"),
    ("groco_loss", dict(topk_neg=N), V_, r"topk_neg must be an int in \[0, B - 1\]"),
    ("groco_loss", dict(views=[q, META(k)]), V_, r"views\[1\] must be on device cpu"),
    ("groco_loss", dict(relaxation="softmax"), V_, r"relaxation must be one of"),
    ("soft_rank", dict(steepness=-2.0), V_, r"steepness must be a finite number > 0"),
    ("soft_rank", dict(x=_t(3, 5).long()), T, r"x must have dtype"),
    ("spearman_loss", dict(target=_t(3, 4)), V_, r"pred and target must have one shape"),
    ("spearman_loss", dict(network="merge"), V_, r"network must be one of"),
    ("neural_sort", dict(tau=0.0), V_, r"tau must be a number > 0"),
    ("neural_sort", dict(mask=torch.ones(3, 4, dtype=torch.bool)), V_, r"mask must have the shape of s"),
    ("neural_sort", dict(mask=torch.tensor([[True, False, False, False, False]] * 3)), V_, r"must be trailing"),
    ("neural_ndcg", dict(labels=torch.zeros(2, 5)), V_, r"labels must have the shape of scores"),
    ("neural_ndcg", dict(k=0), V_, r"k must be an int >= 1"),
    ("neural_ndcg", dict(scores=_t(2, 4).long()), T, r"scores must have dtype"),
]


def _case_id(row):
    name, bad = row[0], row[1]
    return f"{name}-{'-'.join(bad)}"


def test_base_calls_are_valid():
    for name, kwargs in BASE.items():
        out = flatten(_call(name, dict(kwargs)))
        assert all(torch.isfinite(t.float()).all() for t in out if t.is_floating_point()), name


def test_table_covers_every_public_function():
    from family_cases import loss_names
    named = {row[0] for row in BAD_INPUTS}
    missing = (loss_names() | {"topk_threshold"}) - named
    assert not missing, f"public functions without a bad-input row: {missing}"


@pytest.mark.parametrize("row", BAD_INPUTS, ids=[_case_id(r) for r in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(row):
    name, bad, exc, match = row
    kwargs = {**BASE[name], **bad}
    with pytest.raises(exc, match=match):
        _call(name, kwargs)


# ----------------------------------------------------------------------- inputs that must work


def _strided(x):
    """Same values, non-contiguous: every other element of a wider tensor (last dim stride 2)."""
    if x.dim() == 0:
        return x
    wide = torch.stack([x.detach(), torch.zeros_like(x.detach())], dim=-1)
    out = wide[..., 0]
    assert not out.is_contiguous() or x.numel() <= 1
    return out.requires_grad_(x.requires_grad) if x.is_floating_point() else out


def _expanded(x):
    """A stride-0 tensor: the first row repeated (the caller compares with its contiguous copy)."""
    if x.dim() == 0 or x.shape[0] < 2:
        return x
    return x.detach()[:1].expand_as(x)


def _run(fn, inputs):
    outs = flatten(fn(*inputs))
    need = [x for x in inputs if x.is_floating_point() and x.requires_grad]
    terms = [(o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs if o.requires_grad]
    grads = torch.autograd.grad(sum(terms), need, allow_unused=True) if terms and need else ()
    return outs, grads


def _assert_same(a, b, what):
    (oa, ga), (ob, gb) = a, b
    assert len(oa) == len(ob) and len(ga) == len(gb), what
    for x, y in zip(oa, ob):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{what}: {m}")
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None), what
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} grad: {m}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_noncontiguous_and_expanded_inputs_match_contiguous(name):
    fn, inputs = CASES[name](torch.float32)
    want = _run(fn, inputs)
    for i, x in enumerate(inputs):
        if x.dim() == 0:
            continue
        fn_s, ins = CASES[name](torch.float32)
        ins[i] = _strided(ins[i])
        _assert_same(_run(fn_s, ins), want, f"{name}: input {i} non-contiguous")
        if x.is_floating_point() and x.shape[0] >= 2:
            # stride-0 (expanded) vs the same values contiguous
            fn_e, ins_e = CASES[name](torch.float32)
            fn_c, ins_c = CASES[name](torch.float32)
            ins_e[i] = _expanded(ins_e[i]).requires_grad_(x.requires_grad)
            ins_c[i] = _expanded(ins_c[i]).contiguous().requires_grad_(x.requires_grad)
            _assert_same(_run(fn_e, ins_e), _run(fn_c, ins_c), f"{name}: input {i} expanded")


@pytest.mark.parametrize("name", sorted(CASES))
def test_inputs_without_grad_work_and_build_no_graph(name):
    fn, inputs = CASES[name](torch.float32)
    want = flatten(fn(*inputs))
    fn2, ins = CASES[name](torch.float32)
    ins = [x.detach() for x in ins]
    got = flatten(fn2(*ins))
    for x, y in zip(got, want):
        assert not x.requires_grad or name == "ISogCLRLoss", name  # (its temperatures are parameters)
        torch.testing.assert_close(x, y.detach(), rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("fn", ["contrastive_lse", "info_nce", "clip_loss", "siglip_loss"])
def test_scale_as_float_0d_tensor_and_per_row_tensor(fn):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)

    def call(s):
        if fn == "contrastive_lse":
            r = flashloss.contrastive_lse(a, b, s, targets=torch.arange(5), outputs=("row_lse", "pos_sum"))
            return (r.row_lse - r.pos_sum).sum()
        if fn == "info_nce":
            return flashloss.info_nce(a, b, scale=s)
        if fn == "clip_loss":
            return flashloss.clip_loss(a, b, s)
        return flashloss.siglip_loss(a, b, s, torch.tensor(-1.0))

    v_float = call(2.5)
    s0 = torch.tensor(2.5, requires_grad=True)
    v0 = call(s0)
    (g0,) = torch.autograd.grad(v0, s0)
    torch.testing.assert_close(v0, v_float, rtol=1e-6, atol=1e-6)
    sn = torch.full((5,), 2.5, requires_grad=True)
    vn = call(sn)
    (gn,) = torch.autograd.grad(vn, sn)
    torch.testing.assert_close(vn, v_float, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gn.sum(), g0, rtol=1e-5, atol=1e-6)  # d/ds of a shared scale = sum of per-row
    assert call(torch.tensor(2.5)).requires_grad is False  # a tensor scale without grad: no graph
