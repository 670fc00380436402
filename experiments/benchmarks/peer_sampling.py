"""The peer's sampler with top-k/top-p, which ``../shared/peers/run.sh`` does not time.

  ~/.cache/rlhf-peers/venv/bin/python experiments/benchmarks/peer_sampling.py  # any venv with torch, transformers

Hugging Face ``generate`` on a randomly initialised GPT-2 of the bench-small shape (4 x 256, 4 heads, ff 1024,
vocab 4096), 32 prompts x 64 tokens -> exactly 64 sampled tokens, temperature 1, as the peer's ``generate``
line, once per sampling setting. One JSON line per setting: median of 5 calls after 2 warm-up calls.
Compare with ``run.py --only=generate,generate_top_p`` run right before or after, on the same machine.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

SETTINGS = {"plain": dict(top_k=0, top_p=1.0), "top_p_0.9": dict(top_k=0, top_p=0.9),
            "top_k_50": dict(top_k=50, top_p=1.0), "top_k_50_top_p_0.9": dict(top_k=50, top_p=0.9)}


def main() -> None:
  torch.manual_seed(0)
  cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_inner=1024, vocab_size=4096, n_positions=512, resid_pdrop=0.0,
                   embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=3, pad_token_id=0)
  model = GPT2LMHeadModel(cfg).eval()
  prompts = torch.randint(4, 4096, (32, 64))
  for name, cut in SETTINGS.items():
    times = []
    with torch.inference_mode():
      for i in range(2 + 5):
        start = time.perf_counter()
        model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                       max_new_tokens=64, min_new_tokens=64, use_cache=True, pad_token_id=0, eos_token_id=3, **cut)
        if i >= 2:
          times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    print(json.dumps({"name": f"peer_generate_{name}", "new_tokens_per_s": round(32 * 64 / seconds, 1),
                      "s_per_call": round(seconds, 4), **cut}), flush=True)


if __name__ == "__main__":
  main()
