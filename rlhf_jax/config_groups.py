"""Config groups several stage kinds share: optimizer, sampler, train-loop cadence.

Each stage kind defines its own keys next to the code that reads them
(``default_config()`` in its module) and builds these groups for the parts it
has in common with others.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from rlhf_jax.generate import SamplingConfig


def optimizer_config(lr: float, warmup_steps: int = 0, schedule: str = "cosine", weight_decay: float = 0.0,
                     grad_clip: float = 1.0) -> ConfigDict:
  """AdamW settings of one stage (read by ``rlhf_jax.state.make_optimizer``)."""
  return ConfigDict(dict(lr=lr, warmup_steps=warmup_steps, schedule=schedule, end_factor=0.1, b1=0.9, b2=0.95,
                         eps=1e-8, weight_decay=weight_decay, grad_clip=grad_clip))


def sampling_config(max_new_tokens: int = 24, temperature: float = 1.0) -> ConfigDict:
  """Sampler settings (read by ``sampling_from_config``)."""
  return ConfigDict(dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                         greedy=False, stop_at_eos=True, method="inverse_cdf"))


def sampling_from_config(group: ConfigDict, eos_id: int, pad_id: int) -> SamplingConfig:
  """A ``SamplingConfig`` from a ``sampling`` config group and the tokenizer's EOS and padding ids."""
  return SamplingConfig(max_new_tokens=group.max_new_tokens, temperature=group.temperature, top_k=group.top_k,
                        top_p=group.top_p, greedy=group.greedy, stop_at_eos=group.stop_at_eos, eos_id=eos_id,
                        pad_id=pad_id, method=group.method)


def checkpoint_config(checkpoint_every: int, log_every: int = 50, eval_every: int = 0) -> ConfigDict:
  """Logging, evaluation and checkpoint cadence of a trained stage (read by ``stages.loop.run_loop``)."""
  return ConfigDict(dict(log_every=log_every, eval_every=eval_every, checkpoint_every=checkpoint_every,
                         keep_checkpoints=2, async_checkpoints=True))


def loop_config(steps: int, batch_size: int, lr: float, log_every: int = 50) -> ConfigDict:
  """The keys every step-based trained stage has: steps, batch, optimizer, logging and checkpoints."""
  c = ConfigDict(dict(steps=steps, batch_size=batch_size, optimizer=optimizer_config(lr)))
  c.update(checkpoint_config(max(steps // 4, 1), log_every).to_dict())
  return c
