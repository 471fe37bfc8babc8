"""DPO with TRL's DPOTrainer, the loss computed by flashloss (no downloads, CPU, seconds).

A tiny randomly initialised Llama is trained to prefer one completion pattern over another on
synthetic preference pairs: chosen completions repeat the prompt's first word, rejected ones are
random words. `FlashlossDPOTrainer` is TRL's trainer with the log-probs taken from the last hidden
state and the lm_head by flashloss's primitive B (no logits) and the loss from
`flashloss.preference_loss`; any TRL `loss_type` works.

    python examples/dpo_trl_tiny.py --steps 30 --loss-type sigmoid
"""
import argparse
import copy
import os
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from flashloss.integrations.trl import FlashlossDPOTrainer  # noqa: E402

WORDS = [f"w{i}" for i in range(30)]


def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def pairs(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def words(k):
        return [WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=gen).tolist()]

    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        p = words(4)
        prompts.append(" ".join(p) + " ")
        chosen.append(" ".join([p[0]] * 3) + " ")  # repeat the prompt's first word
        rejected.append(" ".join(words(3)) + " ")
    return datasets.Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--loss-type", default="sigmoid")
    ap.add_argument("--beta", type=float, default=0.1)
    args = ap.parse_args()
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=48, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    config = trl.DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=8,
                           logging_steps=1, report_to=[], use_cpu=True, bf16=False, learning_rate=3e-3,
                           save_strategy="no", loss_type=[args.loss_type], beta=args.beta, seed=0,
                           disable_tqdm=True)
    trainer = FlashlossDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=config,
                                  train_dataset=pairs(64), processing_class=tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs[:: max(1, len(logs) // 6)]:
        print(f"step {h['step']:3d}  loss {h['loss']:.4f}  margin {h['rewards/margins']:+.4f}  "
              f"accuracy {h['rewards/accuracies']:.2f}")
    first, last = logs[0], logs[-1]
    print(f"loss fell from {first['loss']:.4f} to {last['loss']:.4f}; reward margin {first['rewards/margins']:+.4f} "
          f"-> {last['rewards/margins']:+.4f}")


if __name__ == "__main__":
    main()
