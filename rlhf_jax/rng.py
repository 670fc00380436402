"""Named random streams: every use of randomness derives its key from the run's seed and a name.

A stream is identified by a string (``"init/policy"``, ``"rollout"``, ...) and,
inside a pipeline, by the stage instance that uses it, so two PPO instances of
one workdir never share rollout keys, and adding a new use (a new name) never
shifts the keys of another: keys are derived by hashing the name, not by
position in a list.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np

# Every stream the library uses, in one place. Values are documentation; the key is the name's hash.
STREAMS = {
    "init/policy": "fresh decoder params (pretrain, or sft without init_from)",
    "init/reward": "fresh scalar-model head (reward stage)",
    "init/value": "fresh value head (ppo with value_init=sft)",
    "label/prompts": "which train prompts the label stage samples (numpy)",
    "label/samples": "the label stage's K samples per prompt",
    "label/rank": "the simulated labelers' noise (numpy, per prompt)",
    "reward/normalize": "samples of the reference policy for RM normalisation",
    "rollout": "PPO rollouts, folded with the iteration",
    "eval": "held-out evaluation samples (the same for every policy of a run)",
    "rft/prompts": "which train prompts an RFT round samples (numpy, per round)",
    "rft/samples": "an RFT round's samples, folded with round and batch",
    "rft/batches": "which selected samples each RFT step trains on (numpy, per step)",
    "bon/samples": "best-of-n evaluation samples",
    "dpo/samples": "online DPO's k samples per prompt, folded with the step",
    "dpo/rank": "online DPO's labeler noise (numpy, per step)",
    "sample": "the `rlhf-jax sample` subcommand, folded with --seed",
}


def stream_id(name: str) -> int:
  """A stable 31-bit id of a stream name (crc32; the same in every process and Python version)."""
  return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def _check(stream: str) -> None:
  if stream not in STREAMS:
    raise KeyError(f"unknown random stream {stream!r}; add it to rlhf_jax.rng.STREAMS")


def key(seed: int, stream: str, instance: str = "") -> jax.Array:
  """The JAX PRNG key of ``stream`` for the stage instance ``instance`` (may be empty) of run ``seed``."""
  _check(stream)
  k = jax.random.fold_in(jax.random.key(seed), stream_id(stream))
  return jax.random.fold_in(k, stream_id(instance)) if instance else k


def numpy_rng(seed: int, stream: str, instance: str = "", *index: int) -> np.random.Generator:
  """A numpy generator of ``stream`` (same naming as ``key``), optionally indexed (e.g. by prompt)."""
  _check(stream)
  return np.random.default_rng([seed, stream_id(stream), stream_id(instance), *index])
