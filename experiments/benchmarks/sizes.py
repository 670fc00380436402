"""Benchmark sizes: the model and the unit of work of each benchmark.

``bench-small`` is DESIGN.md's size (and the PyTorch/TRL peer's); ``tiny`` keeps
the test suite fast; ``gpu-350m`` (~354M params, bf16 compute, fp32 params)
fills one accelerator.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.models import DecoderConfig


@dataclasses.dataclass(frozen=True)
class Size:
  """One benchmark size.

  generate: ``gen_batch`` prompts of ``gen_prompt`` tokens, exactly ``gen_new`` new tokens each.
  sft_step: ``sft_batch`` rows of ``sft_len`` tokens. reward_step: ``rm_pairs`` pairs of ``rm_len`` tokens.
  rl_iter: ``rl_prompts`` x ``rl_samples`` sequences of ``rl_prompt`` + ``rl_new`` tokens.
  matmul_n: side of the square matmul that measures the peak, in ``matmul_dtype``.
  """

  model: DecoderConfig
  gen_batch: int
  gen_prompt: int
  gen_new: int
  sft_batch: int
  sft_len: int
  rm_pairs: int
  rm_len: int
  rl_prompts: int
  rl_samples: int
  rl_prompt: int
  rl_new: int
  matmul_n: int = 2048
  matmul_dtype: str = "float32"


SIZES: dict[str, Size] = {
    "tiny": Size(
        # Query blocks of 16 (the default is 64), so that sft_step_long's rows of 64 take the blocked path.
        model=DecoderConfig(vocab_size=128, num_layers=2, d_model=32, num_heads=2, d_ff=64, max_len=64,
                            attention_block=16),
        gen_batch=2, gen_prompt=8, gen_new=8, sft_batch=2, sft_len=16, rm_pairs=2, rm_len=16,
        rl_prompts=2, rl_samples=2, rl_prompt=8, rl_new=8, matmul_n=128),
    "bench-small": Size(
        model=DecoderConfig(vocab_size=4096, num_layers=4, d_model=256, num_heads=4, d_ff=1024, max_len=512),
        gen_batch=32, gen_prompt=64, gen_new=64, sft_batch=16, sft_len=128, rm_pairs=16, rm_len=128,
        rl_prompts=16, rl_samples=2, rl_prompt=64, rl_new=64),
    # GPT-2 medium shape (24 x 1024, vocab padded to a multiple of 128): 354M params.
    "gpu-350m": Size(
        model=DecoderConfig(vocab_size=50304, num_layers=24, d_model=1024, num_heads=16, d_ff=4096, max_len=1024,
                            dtype="bfloat16", param_dtype="float32"),
        gen_batch=64, gen_prompt=128, gen_new=128, sft_batch=8, sft_len=1024, rm_pairs=8, rm_len=1024,
        rl_prompts=16, rl_samples=2, rl_prompt=128, rl_new=128, matmul_n=8192, matmul_dtype="bfloat16"),
}


def with_matmul_dtype(size: Size, matmul_dtype: str) -> Size:
  """``size`` with ``model.matmul_dtype`` set ('' keeps it); its matmul peak is then timed in that dtype."""
  if not matmul_dtype:
    return size
  return dataclasses.replace(size, model=dataclasses.replace(size.model, matmul_dtype=matmul_dtype),
                             matmul_dtype=matmul_dtype)


def with_overrides(size: Size, spec: str) -> Size:
  """``size`` with ``key=value`` pairs (comma-separated) applied: a field of ``Size`` (``rl_new=448``) or of its
  model with a ``model.`` prefix (``model.attention_block=0``). Values take the field's current type."""
  fields, model_fields = {}, {}
  for item in filter(None, (part.strip() for part in spec.split(","))):
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set: {item!r} is not key=value")
    target, name = (model_fields, key[len("model."):]) if key.startswith("model.") else (fields, key)
    owner = size.model if target is model_fields else size
    known = {f.name for f in dataclasses.fields(owner)} - {"model"}
    if name not in known:
      where = "model." if target is model_fields else ""
      raise ValueError(f"--set: unknown key {key!r}; known: {sorted(where + k for k in known)}")
    target[name] = _typed(getattr(owner, name), text, key)
  model = dataclasses.replace(size.model, **model_fields) if model_fields else size.model
  return dataclasses.replace(size, model=model, **fields)


def _typed(current, text: str, key: str):
  """``text`` as the type of ``current`` (bool from true/false, str for dtypes and None-valued fields)."""
  try:
    if isinstance(current, bool):
      if text.lower() not in ("true", "false"):
        raise ValueError(text)
      return text.lower() == "true"
    if isinstance(current, (int, float)):
      return type(current)(text)
  except ValueError:
    raise ValueError(f"--set: {key}={text!r} is not a valid {type(current).__name__}") from None
  return text
