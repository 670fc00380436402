"""Probe for tests/test_multihost.py: one of several processes (JAX_* variables) that decode on one global
data-parallel mesh with ``sharding.decode: auto``; prints one JSON object.

Each process's clock is faked so that its own timing prefers the other layout than process 0's does
(``view_pays`` times through ``time.perf_counter``): only taking process 0's answer everywhere lets them
compile one program and sample together.
"""

import json
import types

import jax
import numpy as np

from rlhf_jax import decode_layout, distributed, sharding
from rlhf_jax.decode_layout import DecodeLayout
from rlhf_jax.generate import SamplingConfig, make_sampler
from rlhf_jax.models import Decoder, DecoderConfig

distributed.initialize()
# Seconds per call (as trained, view): process 0 finds the training layout faster, the others the view.
durations = (1.0, 2.0) if jax.process_index() == 0 else (2.0, 1.0)
clock = {"calls": 0}


def perf_counter() -> float:
  """Calls come as (start, end) pairs, alternately timing the training layout and the view."""
  i = clock["calls"]
  clock["calls"] += 1
  return 10.0 * (i // 2) + (i % 2) * durations[(i // 2) % 2]


decode_layout.time = types.SimpleNamespace(perf_counter=perf_counter)
decode_layout.AUTO_MIN_STEP_FLOPS = 0.0
cfg = DecoderConfig(vocab_size=96, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, max_len=64)
rules = sharding.DEFAULT_RULES
mesh = sharding.make_mesh({"data": jax.device_count(), "fsdp": 1, "tensor": 1})
graphdef, state = sharding.init_sharded(lambda r: Decoder(cfg, rngs=r), jax.random.key(0), mesh, rules)
prompt = np.random.default_rng(0).integers(4, 96, (8, 6)).astype(np.int32)
batch = sharding.put_batch({"tokens": prompt, "mask": np.ones_like(prompt)}, mesh, rules)
sampler = make_sampler(graphdef, SamplingConfig(max_new_tokens=4, greedy=True, stop_at_eos=False), 1,
                       DecodeLayout(mesh, rules, "auto"))
sample = sampler(state.to_pure_dict(), batch["tokens"], batch["mask"], jax.random.key(1))
print(json.dumps({"process": jax.process_index(), "own_answer_would_be": durations[1] < durations[0],
                  "answers": [c.view for c in decode_layout.timed_choices()],
                  "tokens": distributed.to_host(sample.tokens).tolist()}))
