"""Probe for tests/test_decode_layout.py: run on 4 fake CPU devices, prints one JSON object.

A GQA decoder sampled greedily on a data-parallel mesh, with and without the tensor-parallel decode view:
the view chosen, tokens and log-probs of both, the output shardings, and the collectives each compiles to.
"""

import dataclasses
import json
import os
import re
import tempfile
import types

import jax
import numpy as np
from flax import nnx

from rlhf_jax import decode_layout, sharding
from rlhf_jax.decode_layout import DecodeLayout, decode_mesh
from rlhf_jax.generate import SamplingConfig, make_sampler
from rlhf_jax.models import Decoder, DecoderConfig
from rlhf_jax.rollout import make_rollout_fn

cfg = DecoderConfig(vocab_size=96, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64,
                    max_len=64, flavour="llama")
rules = sharding.DEFAULT_RULES
data = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 1})
graphdef, state = sharding.init_sharded(lambda r: Decoder(cfg, rngs=r), jax.random.key(0), data, rules)
params = state.to_pure_dict()
rows, k = 8, 2
prompt = np.repeat(np.random.default_rng(0).integers(4, 96, (rows // k, 6)).astype(np.int32), k, axis=0)
mask = np.ones_like(prompt)
mask[0, :2] = 0  # a left-padded row
batch = sharding.put_batch({"tokens": prompt, "mask": mask, "group": np.repeat(np.arange(rows // k), k)},
                           data, rules)
greedy = SamplingConfig(max_new_tokens=5, greedy=True, stop_at_eos=False)
out = {"views": {}}
for name, axes in {"data4": {"data": 4}, "fsdp4": {"fsdp": 4, "data": 1}, "data2_tensor2": {"data": 2, "tensor": 2}}.items():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **axes})
  view = decode_mesh(mesh, rules, cfg, "tensor")
  out["views"][name] = None if view is None else dict(view.shape)
out["auto_view"] = dict(decode_mesh(data, rules, cfg, "auto").shape)
odd_vocab = dataclasses.replace(cfg, vocab_size=97)
out["odd_vocab"] = {mode: None if (v := decode_mesh(data, rules, odd_vocab, mode)) is None else dict(v.shape)
                    for mode in ("auto", "tensor")}
out["auto_small_step"] = decode_mesh(data, rules, cfg, "auto", step_flops=1e6)
out["auto_fsdp"] = decode_mesh(sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 1}), rules, cfg, "auto")
out["as_trained"] = decode_mesh(data, rules, cfg, "as_trained")


def collectives(fn, *args) -> dict:
  text = fn.lower(*args).compile().as_text()
  return {op: len(re.findall(rf"= \S+ {op}\(", text)) for op in ("all-reduce", "all-gather")}


key = jax.random.key(1)
layouts = {"plain": None, "tensor": DecodeLayout(data, rules, "tensor"), "auto": DecodeLayout(data, rules, "auto")}
for name, layout in layouts.items():
  sampler = make_sampler(graphdef, greedy, k, layout)
  sample = sampler(params, batch["tokens"], batch["mask"], key)
  rollout_fn = make_rollout_fn(graphdef, greedy, k, layout)
  rollout = rollout_fn(params, batch["tokens"], batch["mask"], batch["group"], key)
  out[name] = {
      "tokens": np.asarray(sample.tokens).tolist(), "log_probs": np.asarray(sample.log_probs).tolist(),
      "rollout_tokens": np.asarray(rollout.response).tolist(),
      "sharding": str(sample.tokens.sharding.spec), "rollout_sharding": str(rollout.response.sharding.spec),
      "collectives": collectives(sampler, params, batch["tokens"], batch["mask"], key)}

# The programs "auto" times: greedy decode steps in each layout give the same tokens, and only the view's
# program talks between devices.
view = decode_mesh(data, rules, cfg, "tensor")
token = jax.device_put(prompt[:, -1], sharding.rows_sharding(data, rules, (rows,)))
timed = {}
for name, v in (("trained", None), ("view", view)):
  steps = decode_layout._decode_steps(graphdef, data, v, rules, rows, 16)
  timed[name] = {"tokens": np.asarray(steps(params, token)).tolist(),
                 "collectives": collectives(steps, params, token)}
out["timed_steps"] = timed

# "auto" above the threshold: the view only where view_pays says so (forced here), timed once per shape.
decode_layout.AUTO_MIN_STEP_FLOPS = 0.0
real_view_pays = decode_layout.view_pays
forced = {}
for answer in (True, False):
  decode_layout.view_pays = lambda *a, answer=answer: answer
  sampler = make_sampler(graphdef, greedy, k, DecodeLayout(data, rules, "auto"))
  forced[str(answer)] = {"tokens": np.asarray(sampler(params, batch["tokens"], batch["mask"], key).tokens).tolist(),
                         "collectives": collectives(sampler, params, batch["tokens"], batch["mask"], key)}
out["forced"] = forced
decode_layout.view_pays = real_view_pays
calls = []
real_steps = decode_layout._decode_steps
decode_layout._decode_steps = lambda *a: calls.append((a[2] is None, a[4], a[5])) or real_steps(*a)
six = SamplingConfig(max_new_tokens=6, greedy=True, stop_at_eos=False)
sample = make_sampler(graphdef, six, k, DecodeLayout(data, rules, "auto"))(params, batch["tokens"], batch["mask"], key)
again = make_sampler(graphdef, six, k, DecodeLayout(data, rules, "auto"))(params, batch["tokens"], batch["mask"], key)
out["measured"] = {"timed": [list(c) for c in calls], "answers": [c.view for c in decode_layout.timed_choices()],
                   "choices": [[c.rows, c.slots, c.view_shape] for c in decode_layout.timed_choices()],
                   "tokens": np.asarray(sample.tokens).tolist(), "again": np.asarray(again.tokens).tolist()}

# A run's record: a new process (memo cleared) takes the recorded answer without timing, a damaged record is
# named, and the view is taken only where it timed VIEW_MIN_SPEEDUP times faster (faked clock).
record = os.path.join(tempfile.mkdtemp(), "decode_layout.json")
seven = SamplingConfig(max_new_tokens=7, greedy=True, stop_at_eos=False)


def sample_with_record(sampling):
  layout = DecodeLayout(data, rules, "auto", record=record)
  sampler = make_sampler(graphdef, sampling, k, layout)
  return collectives(sampler, params, batch["tokens"], batch["mask"], key)["all-reduce"]


calls.clear()
sample_with_record(seven)
first = json.load(open(record))["choices"]
timed_first = len(calls)
flipped = [{**first[0], "view": not first[0]["view"]}]
with open(record, "w") as f:
  json.dump({"choices": flipped}, f)
decode_layout._VIEW_PAYS.clear()
reductions = sample_with_record(seven)
out["record"] = {"entries": len(first), "timed_first": timed_first, "timed_again": len(calls) - timed_first,
                 "recorded_view": flipped[0]["view"], "taken": decode_layout.timed_choices()[-1].view,
                 "all_reduce": reductions}
with open(record, "w") as f:
  f.write("{not json")
decode_layout._VIEW_PAYS.clear()
try:
  sample_with_record(seven)
  out["record"]["damaged"] = None
except ValueError as e:
  out["record"]["damaged"] = str(e)

margin = {}
decode_layout._decode_steps = real_steps
for trained_s in (1.04, 1.06):
  clock = {"calls": 0}

  def perf_counter(durations=(trained_s, 1.0)):
    i = clock["calls"]
    clock["calls"] += 1
    return 10.0 * (i // 2) + (i % 2) * durations[(i // 2) % 2]

  decode_layout.time = types.SimpleNamespace(perf_counter=perf_counter)
  decode_layout._VIEW_PAYS.clear()
  make_sampler(graphdef, seven, k, DecodeLayout(data, rules, "auto"))(params, batch["tokens"], batch["mask"], key)
  margin[str(trained_s)] = decode_layout.timed_choices()[-1].view
out["margin"] = margin
print(json.dumps(out))
