"""tokenizer stage: train a sentencepiece model on the run's text, or take ``tokenizer.path``.

In a run from a Hugging Face checkpoint (a stage input "hf:PATH") the checkpoint's tokenizer is used and
nothing is trained."""

from __future__ import annotations

from ml_collections import ConfigDict

from rlhf_jax.data.tokenizer import train_tokenizer
from rlhf_jax.stages.context import StageContext, StageError, sync


def tokenizer_config() -> ConfigDict:
  """``config.tokenizer``: the one tokenizer instance of a run (its name must be ``tokenizer``)."""
  return ConfigDict(dict(kind="tokenizer", path="", vocab_size=1024, model_type="unigram", byte_fallback=True))


def run(ctx: StageContext, instance) -> dict[str, float]:
  """Trains ``WORKDIR/tokenizer/spm.model`` on pretraining text, demonstrations and prompts (train split)."""
  if instance.name != "tokenizer":
    raise StageError(f"the tokenizer instance must be named 'tokenizer', not {instance.name!r}")
  cfg = instance.section
  if cfg.path or ctx.hf_source:
    return {"tokenizer/vocab_size": float(ctx.tokenizer.vocab_size)}
  if ctx.is_primary:
    texts = [r["text"] for r in ctx.records("pretraining", "train")]
    texts += [r["prompt"] + "\n" + r["response"] for r in ctx.records("demonstrations", "train")]
    texts += [r["prompt"] for r in ctx.records("prompts", "train")]
    train_tokenizer(texts, ctx.tokenizer_path, cfg.vocab_size, model_type=cfg.model_type,
                    byte_fallback=cfg.byte_fallback, seed=ctx.config.seed, hard_vocab_limit=False)
  sync("tokenizer")
  return {"tokenizer/vocab_size": float(ctx.tokenizer.vocab_size)}
