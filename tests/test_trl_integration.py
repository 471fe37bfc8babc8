"""flashloss inside a real trainer: TRL's DPOTrainer on a tiny randomly initialised causal LM (built
from a config, no downloads) and a handful of synthetic preference pairs. The stock trainer and
`flashloss.integrations.trl.FlashlossDPOTrainer` start from the same weights and see the same
batches; their per-step losses and logged rewards must agree to fp32 rounding over several steps."""
import copy
import os
import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")  # CI installs TRL (Makefile); skipped only where it is absent
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from flashloss.integrations.trl import FlashlossDPOTrainer  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
WORDS = [f"w{i}" for i in range(40)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def _dataset(n=8):
    gen = torch.Generator().manual_seed(0)

    def sentence(k):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=gen).tolist()) + " "

    return datasets.Dataset.from_dict({
        "prompt": [sentence(3 + i % 2) for i in range(n)],
        "chosen": [sentence(2 + i % 3) for i in range(n)],
        "rejected": [sentence(1 + i % 4) for i in range(n)],
    })


def _model():
    cfg = transformers.LlamaConfig(vocab_size=43, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _train(trainer_cls, loss_type, steps=4, **config):
    model = _model()
    # bf16=False: TRL defaults to bf16 autocast, under which its LM head rounds the logits to bf16
    # (errors of 7e-4 in log p on this model); fp32 on both sides is the comparison that means something.
    # optim="sgd": Adam divides by the root of the second moment, so gradient components that are zero up
    # to rounding (1e-10 either way) become full learning-rate steps of random sign, and two correct fp32
    # implementations part after one step; with SGD the trajectories stay within fp32 rounding.
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=4,
                         logging_steps=1, report_to=[], use_cpu=True, learning_rate=5e-3, save_strategy="no",
                         loss_type=[loss_type] if isinstance(loss_type, str) else loss_type, seed=0,
                         disable_tqdm=True, bf16=False, optim="sgd", **config)
    trainer = trainer_cls(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=_dataset(),
                          processing_class=_tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, model


@pytest.mark.parametrize("loss_type,config", [
    ("sigmoid", dict(beta=0.1)),
    ("ipo", dict(beta=0.5)),
    ("hinge", dict(beta=2.0)),
    ("robust", dict(beta=0.3, label_smoothing=0.2)),
    (["sigmoid", "sft"], dict(beta=0.1, loss_weights=[1.0, 0.5])),
])
def test_dpo_trainer_losses_match_trl(loss_type, config):
    ours, model_ours = _train(FlashlossDPOTrainer, loss_type, **config)
    theirs, model_theirs = _train(trl.DPOTrainer, loss_type, **config)
    assert len(ours) == len(theirs) == 4
    beta = config["beta"]
    for step, (a, b) in enumerate(zip(ours, theirs)):
        # fp32 tolerance on the quantities the trainers compute: 1e-5 relative on log-probs; rewards are
        # beta times differences of log-probs, so their absolute tolerance is beta * 1e-5 * |log p|
        scale = max(1.0, abs(b["logps/chosen"]), abs(b["logps/rejected"]))
        for key in ("loss", "logps/chosen", "logps/rejected", "entropy", "logits/chosen", "logits/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (step, key, a[key], b[key])
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert a[key] == pytest.approx(b[key], abs=2 * beta * 1e-5 * scale), (step, key, a[key], b[key])
    # training moved the weights, identically
    moved = sum((p - q).abs().sum() for p, q in zip(model_ours.parameters(), _model().parameters()))
    assert moved > 0
    for p, q in zip(model_ours.parameters(), model_theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
