"""The peer's DPO step, which ``../shared/peers/run.sh`` does not time: ``trl.DPOTrainer`` at ``dpo_step``'s size.

  ~/.cache/rlhf-peers/venv/bin/python experiments/benchmarks/peer_dpo.py  # any venv with torch, transformers, trl

A randomly initialised GPT-2 of the bench-small shape (4 x 256, 4 heads, ff 1024, vocab 4096), fp32, trained by
``trl.DPOTrainer`` with its defaults (sigmoid loss, beta 0.1, lr 1e-6, clip 1.0, a frozen reference copy whose
log-probs are computed in every step) on pre-tokenized examples: 16 prompts of 64 tokens per step, each with a
chosen and a rejected response of 64 tokens, i.e. one forward and backward over 32 x 128 plus the reference's
forward. One JSON line: the median wall time per optimizer step (``on_step_end`` to ``on_step_end``) after
warm-up steps. Compare with ``run.py --only=dpo_step`` run right before or after, on the same machine.
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerCallback
from trl import DPOConfig, DPOTrainer

PAIRS, PROMPT, RESPONSE, VOCAB = 16, 64, 64, 4096
STEPS, WARMUP = 15, 3


class StepPeriods(TrainerCallback):
  """Seconds between consecutive optimizer steps' ends (data collation and logging included)."""

  def __init__(self):
    self.last = None
    self.periods = []

  def on_step_end(self, args, state, control, **kwargs):
    now = time.perf_counter()
    if self.last is not None:
      self.periods.append(now - self.last)
    self.last = now


def tokenizer() -> PreTrainedTokenizerFast:
  """A word-level tokenizer: ids 0..3 are <pad> <bos> <unk> <eos>, the words w4..w4095 the other ids. DPOTrainer
  tokenizes text examples itself, and this maps each word of a random example back to exactly one token."""
  special = ["<pad>", "<bos>", "<unk>", "<eos>"]
  vocab = {**{w: i for i, w in enumerate(special)}, **{f"w{i}": i for i in range(len(special), VOCAB)}}
  words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok = PreTrainedTokenizerFast(tokenizer_object=words)
  tok.add_special_tokens({"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"})
  return tok


def main() -> None:
  torch.manual_seed(0)
  cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_inner=1024, vocab_size=VOCAB, n_positions=512, resid_pdrop=0.0,
                   embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=3, pad_token_id=0)
  model = GPT2LMHeadModel(cfg)
  n = STEPS * PAIRS
  # Text of random token words, each ending in a space: the trainer joins prompt and response and appends the EOS
  # word to a response, so a response tokenizes to RESPONSE - 1 random tokens and EOS.
  text = lambda length, end: [" ".join(f"w{i}" for i in row) + end  # noqa: E731
                              for row in torch.randint(4, VOCAB, (n, length)).tolist()]
  data = Dataset.from_dict({"prompt": text(PROMPT, " "), "chosen": text(RESPONSE - 1, " "),
                            "rejected": text(RESPONSE - 1, " ")})
  args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="peer_dpo_"), max_steps=STEPS, per_device_train_batch_size=PAIRS,
                   gradient_accumulation_steps=1, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                   report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
                   seed=0, max_length=None, beta=0.1)
  # The reference is the initial policy, passed as a copy (TRL would reload it from the model's hub id).
  trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=args, train_dataset=data,
                       processing_class=tokenizer())
  first = trainer.train_dataset[0]
  lengths = {k: len(v) for k, v in first.items() if k.endswith("_ids")}
  if lengths != {"prompt_ids": PROMPT, "chosen_ids": RESPONSE, "rejected_ids": RESPONSE}:
    raise RuntimeError(f"the trainer's tokenized example has lengths {lengths}")
  periods = StepPeriods()
  trainer.add_callback(periods)
  with contextlib.redirect_stdout(sys.stderr):
    trainer.train()
  seconds = statistics.median(periods.periods[WARMUP - 1:])
  print(json.dumps({"name": "peer_dpo_step", "pairs_per_s": round(PAIRS / seconds, 2),
                    "ms_per_step": round(1e3 * seconds, 2), "timed_steps": len(periods.periods[WARMUP - 1:]),
                    "pairs": PAIRS, "prompt_len": PROMPT, "response_len": RESPONSE,
                    "torch_threads": torch.get_num_threads(),
                    "loss_type": list(args.loss_type), "learning_rate": args.learning_rate,
                    "max_grad_norm": args.max_grad_norm, "precompute_ref_log_probs": args.precompute_ref_log_probs}),
        flush=True)


if __name__ == "__main__":
  main()
