"""Pretraining a language model alone, on the default task's text.

  rlhf-jax --config=configs/lm.py:small --workdir=/tmp/lm
Presets: tiny (default), small, gpt2, llama.
"""

from rlhf_jax import defaults


def get_config(arg=None):
  preset = arg or "tiny"
  config = defaults.base_config()
  config.stages = "tokenizer,pretrain"
  config.model = defaults.model_config(preset, vocab_size=config.tokenizer.vocab_size)
  return config
