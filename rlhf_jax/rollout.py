"""The one rollout: prompts, sampled responses and the log-probs they were drawn with.

Every stage that samples from a policy (label, reward normalisation, PPO, eval,
and later RFT, best-of-n, GRPO, RLOO, online DPO) makes its samples with
``make_rollout_fn`` and reads per-token log-probs with ``response_log_probs``,
so prompt+response concatenation, the response window and the definition of
the policy's distribution live here only.

Layout: a left-padded prompt [B, P] and a right-padded response [B, N]; the
full sequence is ``prompt ++ response`` [B, P + N]. Response token i sits at
column P + i and is predicted from column P + i - 1, so every per-token
tensor is the window ``[:, P - 1 : P + N - 1]`` of a forward pass over the
full sequence.

The policy's distribution (what KL, PPO ratios and evaluation measure) is the
model's softmax at the sampling temperature. Top-k / top-p only filter what
the sampler proposes: they are left out of log-probs used for learning, so a
policy's KL to itself is 0 for every sampling setting and a token can never
fall outside the support of the distribution it is scored under.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from rlhf_jax import distributed
from rlhf_jax.data.bucketing import bucket_width
from rlhf_jax.decode_layout import DecodeLayout
from rlhf_jax.generate import Sample, SamplingConfig, fitting_group, layout_generate

Array = jax.Array


@struct.dataclass
class Rollout:
  """Responses sampled from one policy.

  prompt, prompt_mask: [B, P] left-padded; response, response_mask: [B, N] right-padded;
  log_probs: [B, N] float32 log-probs of the sampled tokens under the distribution they were drawn
  from (temperature, top-k, top-p), 0 where ``response_mask`` is 0; group: [B] int32 prompt index,
  equal for the k samples of one prompt.
  prompt_group (static): g > 1 promises that rows ``i*g .. i*g+g-1`` hold the same prompt; every model pass
  over the rollout (``response_hidden``, value, reward) then computes each prompt once
  (``Trunk(shared_prefix=...)``), and PPO's minibatches keep those rows together.
  """

  prompt: Array
  prompt_mask: Array
  response: Array
  response_mask: Array
  log_probs: Array
  group: Array
  prompt_group: int = struct.field(pytree_node=False, default=1)

  @property
  def shared_prefix(self) -> tuple[int, int] | None:
    """``(P, prompt_group)`` for ``Trunk(shared_prefix=...)``, or None (every row computes its prompt)."""
    return (self.prompt_len, self.prompt_group) if self.prompt_group > 1 else None

  @property
  def prompt_len(self) -> int:
    return self.prompt.shape[1]

  @property
  def response_len(self) -> int:
    return self.response.shape[1]

  @property
  def tokens(self) -> Array:
    """The full sequences [B, P + N]."""
    return jnp.concatenate([self.prompt, self.response], axis=1)

  @property
  def mask(self) -> Array:
    """Attention mask [B, P + N] (int32) of the full sequences."""
    return jnp.concatenate([self.prompt_mask.astype(jnp.int32), self.response_mask.astype(jnp.int32)], axis=1)

  def with_response(self, response: Array, response_mask: Array) -> "Rollout":
    """The same rollout with its response replaced (e.g. truncated at a stop token); log-probs masked."""
    return self.replace(response=response, response_mask=response_mask,
                        log_probs=jnp.where(response_mask.astype(bool), self.log_probs, 0.0))


def response_lengths(rollout: Rollout) -> np.ndarray:
  """Each row's response length in tokens, read to the host [B] (a collective on a multi-host run)."""
  return distributed.to_host(rollout.response_mask.astype(jnp.int32).sum(axis=1))


def trim_response_width(rollout: Rollout, smallest: int, lengths: np.ndarray | None = None) -> Rollout:
  """The rollout with its response columns cut to the bucket width (``bucketing.bucket_width``, ``smallest``
  0 = off) of its longest response.

  The cut columns are padding in every row, and nothing a learner computes reads them: token means, GAE
  and KL are masked, values and advantages are 0 after a response ends. So the experience and the update
  run over [B, P + W] instead of [B, P + N] with the same values up to rounding, as TRL pads to the longest
  completion. ``lengths`` [B]: the rows' ``response_lengths`` when the caller already holds them; else they
  are read here (a collective on a multi-host run: call it on every process).
  """
  n = rollout.response_len
  if lengths is None:
    lengths = response_lengths(rollout)
  width = bucket_width(max(int(np.max(lengths, initial=0)), 1), n, smallest)
  if width == n:
    return rollout
  return rollout.replace(response=rollout.response[:, :width], response_mask=rollout.response_mask[:, :width],
                         log_probs=rollout.log_probs[:, :width])


def rollout_from_sample(prompt: Array, prompt_mask: Array, sample: Sample, group: Array | None = None) -> Rollout:
  """Wraps a sampler ``Sample`` and its prompts as a ``Rollout`` (group defaults to one per row)."""
  if group is None:
    group = jnp.arange(prompt.shape[0], dtype=jnp.int32)
  return Rollout(prompt=prompt, prompt_mask=prompt_mask, response=sample.tokens, response_mask=sample.mask,
                 log_probs=sample.log_probs, group=group)


@functools.lru_cache(maxsize=64)
def make_rollout_fn(graphdef: nnx.GraphDef, sampling: SamplingConfig, prompt_group: int = 1,
                    layout: DecodeLayout | None = None) -> Callable[..., Rollout]:
  """Jitted ``rollout(params, prompt, prompt_mask, group, key) -> Rollout`` sampling a decoder.

  One function per distinct set of arguments in a process: stages that sample the same model the same way
  (each stage's evaluation, the label stage and the reward normalisation) share its traced and compiled
  programs instead of tracing and compiling them again.

  ``prompt_group`` g > 1: rows come as runs of g samples of one prompt (``repeat_prompts``, or a run length
  dividing its k: see ``shared_run``), so the sampler prefills each prompt once (``generate``) and the
  rollout comes marked ``Rollout.prompt_group`` g, so every later pass over it shares the prompt too. A
  call whose rows g does not divide (padded to fit a mesh) prefills per row and comes unmarked.
  ``layout``: where the weights sit while decoding (``decode_layout``; the stages pass ``ctx.decode_layout``).
  """

  @jax.jit
  def rollout(params, prompt: Array, prompt_mask: Array, group: Array, key: Array) -> Rollout:
    g = fitting_group(prompt_group, prompt.shape[0])
    sample = layout_generate(nnx.merge(graphdef, params), prompt, prompt_mask, key, sampling, g, layout)
    return rollout_from_sample(prompt, prompt_mask, sample, group).replace(prompt_group=g)

  return rollout


def repeat_prompts(prompts: Sequence[str], k: int) -> tuple[list[str], np.ndarray]:
  """Each prompt k times in a row -> (prompts [B*k], group ids [B*k] int32)."""
  if k < 1:
    raise ValueError(f"samples per prompt must be >= 1, got {k}")
  return [p for p in prompts for _ in range(k)], np.repeat(np.arange(len(prompts), dtype=np.int32), k)


def shared_run(samples_per_prompt: int, chunk_rows: int) -> int:
  """The rows that share a prompt in every chunk of ``chunk_rows`` rows of ``repeat_prompts(..., k)``'s output
  cut at multiples of ``chunk_rows``: gcd(k, chunk_rows), runs aligned to multiples of it."""
  return math.gcd(samples_per_prompt, chunk_rows)


def response_window(x: Array, prompt_len: int, response_len: int) -> Array:
  """Columns P-1 .. P+N-2 of a full-sequence tensor [B, P+N, ...]: the state before each response token."""
  return x[:, prompt_len - 1:prompt_len + response_len - 1]


def policy_log_probs(logits: Array, sampling: SamplingConfig) -> Array:
  """Log-probs [..., V] (float32) of the policy's distribution: softmax at the sampling temperature.

  Greedy decoding uses temperature 1. Top-k/top-p are not applied (see the module docstring).
  """
  return jax.nn.log_softmax(_at_temperature(logits, sampling), axis=-1)


def _at_temperature(logits: Array, sampling: SamplingConfig) -> Array:
  """Logits (float32) of the policy's distribution: divided by the sampling temperature (1 when greedy)."""
  logits = logits.astype(jnp.float32)
  if not sampling.is_greedy and sampling.temperature != 1.0:
    logits = logits / sampling.temperature
  return logits


def token_log_probs(logits: Array, tokens: Array, mask: Array, sampling: SamplingConfig) -> tuple[Array, Array]:
  """(log-prob [B, N] of each token, entropy [B, N] in nats) of the policy's distribution (``policy_log_probs``)
  from logits [B, N, V]; log-probs are 0 where mask is 0.

  As ``picked(policy_log_probs(...))`` and ``-(p * log p).sum(-1)``, through the log-normaliser: no
  [B, N, V] log-probs are materialised (timed alone on a 2-core CPU, the PPO update's vocabulary block,
  forward and backward, ran 2.4x faster this way). An unused entropy costs nothing under jit.
  """
  logits = _at_temperature(logits, sampling)
  normaliser = jax.nn.logsumexp(logits, axis=-1)
  lp = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0] - normaliser
  probs = jnp.exp(logits - normaliser[..., None])
  entropy = normaliser - (probs * logits).sum(axis=-1)
  return jnp.where(mask.astype(bool), lp, 0.0), entropy


def picked(log_probs: Array, tokens: Array, mask: Array) -> Array:
  """Log-prob [B, N] of each token from log_probs [B, N, V]; 0 where mask is 0."""
  lp = jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.where(mask.astype(bool), lp, 0.0)


def response_hidden(graphdef: nnx.GraphDef, params, rollout: Rollout) -> tuple[nnx.Module, Array]:
  """(model, trunk hidden states [B, N, D] of the state before each response token)."""
  model = nnx.merge(graphdef, params)
  # Only the window's rows are queried in the last block (the same values as slicing the full output).
  hidden, _ = model.trunk(rollout.tokens, rollout.mask, queries=(rollout.prompt_len - 1, rollout.response_len),
                          shared_prefix=rollout.shared_prefix)
  return model, hidden


def response_log_probs(graphdef: nnx.GraphDef, params, rollout: Rollout,
                       sampling: SamplingConfig) -> tuple[Array, Array]:
  """Teacher-forced log-probs of a rollout's responses under a policy.

  Returns ``(token_log_probs [B, N], entropy [B, N])`` of ``policy_log_probs`` (``token_log_probs``); token
  log-probs are 0 where the response mask is 0. Used for old and new PPO log-probs, the reference
  policy, DPO and ``eval/kl``: one definition everywhere.
  """
  model, hidden = response_hidden(graphdef, params, rollout)
  return token_log_probs(model.logits_from_hidden(hidden), rollout.response, rollout.response_mask, sampling)


def response_texts(tokenizer, rollout: Rollout) -> list[str]:
  """Decoded responses of a rollout (EOS and padding dropped); every row, on every process of a multi-host run."""
  tokens, mask = distributed.to_host((rollout.response, rollout.response_mask))
  return [tokenizer.decode([int(t) for t, m in zip(row, row_mask) if m]) for row, row_mask in zip(tokens, mask)]
