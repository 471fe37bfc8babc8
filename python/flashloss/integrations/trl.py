"""TRL integration: `FlashlossDPOTrainer`, huggingface/trl's `DPOTrainer` with the preference loss
computed by flashloss from the last hidden states and the lm_head weight.

TRL 1.x already avoids the full logits with its own chunked LM head; this trainer replaces both
that head and the loss: per-token log-probs, entropy and mean logits come from primitive B
(`flashloss.token_logprobs`, any backend; prompt and padding tokens are dropped before the
vocabulary matmul), the reference model runs through the same primitive with no grad (nothing
saved), and the loss and its metrics come from `flashloss.preference_loss` with the trainer's own
`loss_type`, `beta`, `label_smoothing`, `loss_weights`, `f_divergence_type` and `ld_alpha` /
`use_weighting` settings. Per-step losses equal TRL's to fp32 rounding
(tests/test_trl_integration.py).

Scope: single-process (or DDP through accelerate: the model call goes through the backbone of the
wrapped module); not PEFT-without-reference-copy, not vision models. `mean_token_accuracy` is not
logged (it needs an argmax output the primitive does not have yet).
"""
from __future__ import annotations

import torch
from trl import DPOTrainer

from ..ops.token_logprobs import token_logprobs
from ..preference import preference_loss

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def _head_settings(model) -> dict:
    """The logit map of the model (softcap, scale), read from its config like TRL's fused head."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    return dict(softcap=softcap, logit_scale=1.0 if scale is None else float(scale))


def _per_token(model, model_kwargs, labels, backend, outputs):
    """Per-token statistics [B, T-1] of the shifted labels from `model`'s backbone and lm_head."""
    hidden = model.base_model(**model_kwargs).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    head = model.get_output_embeddings()
    return token_logprobs(hidden, head.weight, targets, head.bias, outputs=outputs, backend=backend,
                          **_head_settings(model))


class FlashlossDPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` whose loss is computed by flashloss (same constructor and config).

    Extra keyword: `flashloss_backend` ("auto" by default) for primitive B.
    """

    def __init__(self, *args, flashloss_backend: str = "auto", **kwargs):
        self.flashloss_backend = flashloss_backend
        super().__init__(*args, **kwargs)

    def _sequence_sums(self, per_token_logp, mask):
        if self.ld_alpha is None:
            return per_token_logp.sum(1)
        # LD-DPO: tokens past the shorter completion of the pair count ld_alpha (OBJECTIVES §3.3)
        pos = mask.cumsum(1)
        lengths = mask.sum(1)
        chosen_len, rejected_len = lengths.chunk(2)
        shared = torch.minimum(chosen_len, rejected_len).repeat(2)[:, None]
        head = (pos > 0) & (pos <= shared)
        return (per_token_logp * head).sum(1) + self.ld_alpha * (per_token_logp * (pos > shared)).sum(1)

    def _compute_loss(self, model, inputs, return_outputs):
        if return_outputs:
            raise NotImplementedError("FlashlossDPOTrainer never builds logits: return_outputs is not supported")
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        mask = completion_mask[:, 1:].to(torch.float32)
        unwrapped = self.accelerator.unwrap_model(model)
        outs = ("logp", "entropy", "z_sum") + (("log_sum_p2",) if self.use_weighting else ())
        stats = _per_token(unwrapped, model_kwargs, labels, self.flashloss_backend, outs)
        logps = self._sequence_sums(stats.logp, mask)
        chosen, rejected = logps.chunk(2)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            with torch.no_grad():  # forward-only reference: nothing is saved
                ref = _per_token(self.accelerator.unwrap_model(self.ref_model), model_kwargs, labels,
                                 self.flashloss_backend, ("logp",))
                # TRL 1.x applies LD-DPO's weighting to the reference too
                ref_logps = self._sequence_sums(ref.logp, mask)
            ref_chosen, ref_rejected = ref_logps.chunk(2)
        lengths = mask.sum(1)
        chosen_len, rejected_len = lengths.chunk(2)
        chosen_mask = mask.chunk(2)[0]
        chosen_nll = -(stats.logp.chunk(2)[0] * chosen_mask).sum() / chosen_mask.sum().clamp_min(1)
        wpo = None
        if self.use_weighting:
            with torch.no_grad():
                w = torch.exp(((stats.logp - stats.log_sum_p2) * mask).sum(1) / lengths.clamp_min(1))
            wpo = tuple(w.chunk(2))
        loss, metrics = preference_loss(
            chosen, rejected, ref_chosen, ref_rejected, loss_type=list(self.loss_types), beta=self.beta,
            label_smoothing=self.label_smoothing, loss_weights=list(self.loss_weights),
            chosen_lengths=chosen_len, rejected_lengths=rejected_len, f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef, chosen_nll=chosen_nll, wpo_weights=wpo,
            backend=self.flashloss_backend)
        self._log_flashloss_metrics(mode, metrics, stats, mask, unwrapped.get_output_embeddings().weight.shape[0])
        return loss

    def _log_flashloss_metrics(self, mode, metrics, stats, mask, vocab):
        m = self._metrics[mode]
        total = mask.sum()
        m["entropy"].append(((stats.entropy.detach() * mask).sum() / total.clamp_min(1)).item())
        mean_logits = stats.z_sum.detach() / vocab
        for name, part, pm in zip(("logits/chosen", "logits/rejected"), mean_logits.chunk(2), mask.chunk(2)):
            m[name].append(((part * pm).sum() / pm.sum().clamp_min(1)).item())
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                    "logps/rejected"):
            if key in metrics:
                m[key].append(float(metrics[key].float().mean()))

