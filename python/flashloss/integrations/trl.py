"""TRL integration: `FlashlossDPOTrainer`, huggingface/trl's `DPOTrainer` with the preference loss
computed by flashloss from the last hidden states and the lm_head weight.

TRL 1.x already avoids the full logits with its own chunked LM head; this trainer replaces both
that head and the loss with `flashloss.FusedLinearPreferenceLoss`, configured from the trainer's
own `loss_type`, `beta`, `label_smoothing`, `loss_weights`, `f_divergence_type`, `ld_alpha` and
`use_weighting`: per-token statistics from primitive B (any backend; prompt and padding tokens never
reach the vocabulary matmul), the reference model through the same primitive with no grad (nothing
saved) or TRL's precomputed reference log-probs, the loss and its metrics from
`flashloss.preference`. Per-step losses equal TRL's to fp32 rounding (tests/test_trl_integration.py).

Scope: single-process (or DDP through accelerate: the model call goes through the backbone of the
wrapped module); not PEFT-without-reference-copy, not vision models. `mean_token_accuracy` is not
logged (it needs an argmax output the primitive does not have yet).
"""
from __future__ import annotations

import torch
from trl import DPOTrainer

from ..fused_preference import FusedLinearPreferenceLoss

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
_LOGGED = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "entropy")


def _head_settings(model) -> dict:
    """The logit map of the model (softcap, scale), read from its config like TRL's fused head."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    return dict(softcap=softcap, logit_scale=1.0 if scale is None else float(scale))


class FlashlossDPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` whose loss is computed by flashloss (same constructor and config).

    Extra keyword: `flashloss_backend` ("auto" by default) for primitive B.
    """

    def __init__(self, *args, flashloss_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.flashloss_loss = FusedLinearPreferenceLoss(
            list(self.loss_types), self.beta, label_smoothing=self.label_smoothing,
            loss_weights=list(self.loss_weights), ld_alpha=self.ld_alpha, use_weighting=self.use_weighting,
            backend=flashloss_backend, f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef, **_head_settings(self.model))

    def _compute_loss(self, model, inputs, return_outputs):
        if return_outputs:
            raise NotImplementedError("FlashlossDPOTrainer never builds logits: return_outputs is not supported")
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        policy = self.accelerator.unwrap_model(model)
        hidden = policy.base_model(**model_kwargs).last_hidden_state
        head = policy.get_output_embeddings()
        if self.precompute_ref_logps:
            ref = dict(ref_chosen_logps=inputs["ref_chosen_logps"], ref_rejected_logps=inputs["ref_rejected_logps"])
        else:
            ref_model = self.accelerator.unwrap_model(self.ref_model)
            with torch.no_grad():
                ref_hidden = ref_model.base_model(**model_kwargs).last_hidden_state
            ref_head = ref_model.get_output_embeddings()
            ref = dict(ref_hidden=ref_hidden, ref_weight=ref_head.weight, ref_bias=ref_head.bias)
        loss, metrics = self.flashloss_loss(hidden, head.weight, labels, head.bias, **ref)
        for key in _LOGGED:
            if key in metrics:
                self._metrics[mode][key].append(float(metrics[key].float().mean()))
        return loss
