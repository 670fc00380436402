"""The benchmarks: each builds its inputs at one ``Size``, drives the library's own compiled
functions and returns one JSON-able record. Units are in the key names (``_s`` seconds, ``_per_s``
per second); times are medians of ``reps`` calls after one warm-up, compile time apart.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks import library
from experiments.benchmarks.sizes import Size
from experiments.benchmarks.timing import bench, peak_rss_mb, timed
from rlhf_jax import generate as generate_lib, sharding as shd, state as state_lib
from rlhf_jax.generate import SamplingConfig
from rlhf_jax.models import Decoder, DecoderConfig, ScalarModel, reward_head_std

Record = dict[str, Any]
FIRST_TOKEN = 4  # ids below are pad/bos/eos/unk: random data never holds them, so EOS never stops a row


@dataclasses.dataclass
class Env:
  """What every benchmark shares: the size, the mesh and the measured matmul peak (GFLOP/s)."""

  size: Size
  reps: int
  mesh: jax.sharding.Mesh
  rules: tuple
  decode: str = "auto"  # config.sharding.decode: where samplers keep the weights while decoding
  peak_gflops: float | None = None
  mem_gbps: float | None = None
  inits: dict = dataclasses.field(default_factory=dict)

  @property
  def model(self) -> DecoderConfig:
    return self.size.model


def make_env(size: Size, reps: int) -> Env:
  mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  return Env(size=size, reps=reps, mesh=mesh, rules=shd.DEFAULT_RULES)


def init_params(env: Env, make: Callable[[nnx.Rngs], nnx.Module], seed: int,
                kind: str | None = None) -> tuple[nnx.GraphDef, dict, dict]:
  """Sharded init of a module -> (graphdef, params as a plain dict, their shardings).

  With ``kind`` the first init of that kind is kept and later calls get a copy: on a GPU the jitted
  init of a 350M model compiles for ~70 s, more than the benchmarks it feeds.
  """
  if kind not in env.inits:
    graphdef, params = shd.init_sharded(make, jax.random.key(seed), env.mesh, env.rules)
    abstract = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))[1]
    env.inits[kind] = graphdef, params.to_pure_dict(), state_lib.param_shardings(abstract, env.mesh, env.rules)
  graphdef, params, shardings = env.inits[kind]
  if kind is None:
    del env.inits[None]
    return graphdef, params, shardings
  # A copy: train states donate their params.
  return graphdef, jax.tree.map(jnp.copy, params), shardings


def count_params(params: Any) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def random_tokens(env: Env, shape: tuple[int, ...], seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(FIRST_TOKEN, env.model.vocab_size, shape, dtype=np.int32)


def put_batch(env: Env, batch: Any) -> Any:
  return jax.tree.map(lambda x: jax.device_put(x, shd.batch_sharding(env.mesh, env.rules, np.ndim(x))), batch)


def batch_shardings(env: Env, batch: Any) -> Any:
  return jax.tree.map(lambda x: shd.batch_sharding(env.mesh, env.rules, x.ndim), batch)


def optimizer(lr: float, grad_clip: float):
  """The library's AdamW at a constant rate, weight decay 0 (the peer's settings)."""
  return state_lib.make_optimizer({"lr": lr, "schedule": "constant", "weight_decay": 0.0, "grad_clip": grad_clip},
                                  1_000_000)


def common(name: str, env: Env, **fields) -> Record:
  # The load average says whether other work shared the machine while this ran.
  return {"name": name, **fields, "backend": jax.default_backend(), "devices": jax.device_count(),
          "peak_rss_mb": round(peak_rss_mb(), 1), "load_avg_1m": round(os.getloadavg()[0], 2)}


# ----------------------------------------------------------------------------- ceilings

def matmul_peak(env: Env) -> Record:
  """GFLOP/s of one n x n x n matmul with operands in the size's dtype, accumulated and returned in float32
  as the models' products are (median and max over reps); MFU uses the max."""
  n, dtype = env.size.matmul_n, jnp.dtype(env.size.matmul_dtype)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  inner = 10
  timed(lambda: mm(a, b))
  gflops = []
  for _ in range(max(env.reps, 5)):
    seconds, _ = timed(lambda: [mm(a, b) for _ in range(inner)])
    gflops.append(2 * n ** 3 * inner / seconds / 1e9)
  env.peak_gflops = max(gflops)
  return common("matmul_peak", env, gflops=round(float(np.median(gflops)), 1), gflops_max=round(max(gflops), 1),
                n=n, dtype=str(dtype))


def read_bandwidth(env: Env, nbytes: int) -> float:
  """GB/s at which one compiled sum reads a float32 array of ``nbytes``: the best of the reps (a ceiling,
  as ``matmul_peak``'s max), each timing 10 sums back to back.

  Read-only on purpose: a pass that writes a fresh output of that size times, on a CPU, the first touch of
  its new pages as much as memory (10 GB/s against 53 GB/s read at 64 MB on the dev machine), and a decode
  step mostly reads (weights, KV cache)."""
  x = jnp.ones((max(nbytes // 4, 1024),), jnp.float32)
  f = jax.jit(lambda x: x.sum())
  inner = 10
  stats = bench(lambda: [f(x) for _ in range(inner)], max(env.reps, 5))
  return inner * x.size * 4 / stats["min_s"] / 1e9


def mem_bandwidth(env: Env) -> Record:
  """GB/s read by a sum over a large float32 array (64 MB on CPU, 1 GiB on an accelerator)."""
  n = (64 << 20) if jax.default_backend() == "cpu" else (1 << 30)
  if env.size.matmul_n < 1024:  # the tiny test size
    n = 4 << 20
  env.mem_gbps = read_bandwidth(env, n)
  return common("mem_bandwidth", env, gbps=round(env.mem_gbps, 1), bytes=n, access="read")


# ----------------------------------------------------------------------------- generate

GROUPED_SAMPLES = 4  # samples per prompt of ``generate_grouped`` (as best-of-n, label, RLOO/GRPO draw them)


def generate(env: Env, samples_per_prompt: int = 1, name: str = "generate", top_p: float = 1.0) -> Record:
  """``make_sampler``: prefill + exactly ``gen_new`` sampled tokens per prompt (temperature 1, no EOS stop).

  ``samples_per_prompt`` k > 1: gen_batch rows are gen_batch / k prompts k times each, as the stages that draw
  several samples per prompt lay them out (the sampler prefills each prompt once). ``top_p`` < 1: nucleus
  sampling, the cut made every decode step.
  """
  s = env.size
  k = samples_per_prompt
  graphdef, params, _ = init_params(env, lambda r: Decoder(env.model, rngs=r), 0, "lm")
  prompt = put_batch(env, np.repeat(random_tokens(env, (s.gen_batch // k, s.gen_prompt), 1), k, axis=0))
  mask = put_batch(env, np.ones((s.gen_batch, s.gen_prompt), np.int32))
  sampling = SamplingConfig(max_new_tokens=s.gen_new, temperature=1.0, top_p=top_p, stop_at_eos=False)
  try:
    sampler = generate_lib.make_sampler(graphdef, sampling, k, **_layout_kwargs(generate_lib.make_sampler, env))
  except TypeError:  # a library from before the shared prefill
    sampler = generate_lib.make_sampler(graphdef, sampling)
  key = jax.random.key(2)
  stats = bench(lambda: sampler(params, prompt, mask, key).tokens, env.reps)
  new_tokens = s.gen_batch * s.gen_new
  rec = common(name, env,
               new_tokens_per_s=round(new_tokens / stats["median_s"], 1),
               s_per_call=round(stats["median_s"], 4), compile_s=round(stats["compile_s"], 2),
               batch=s.gen_batch, prompt_len=s.gen_prompt, new_tokens=s.gen_new,
               samples_per_prompt=k, top_p=top_p)
  if env.mem_gbps:
    # Each decode step must read every weight (in the compute dtype) and the filled KV cache once, at the
    # bandwidth of a read over that many bytes: on a CPU whose last-level cache holds them that is the
    # cache's bandwidth, not DRAM's (bench-small's 34 MB on a 504 MiB L3).
    m = env.model
    itemsize = jnp.dtype(m.dtype).itemsize
    cache_len = s.gen_prompt + s.gen_new - 1
    cache_bytes = 2 * m.num_layers * s.gen_batch * cache_len * m.kv_heads * m.head_dim * itemsize
    step_bytes = count_params(params) * itemsize + cache_bytes / 2  # the cache is half full on average
    gbps = read_bandwidth(env, int(step_bytes))
    bound_s = s.gen_new * step_bytes / (gbps * 1e9)
    rec.update(memory_bound_s=round(bound_s, 4), fraction_of_memory_bound=round(bound_s / stats["median_s"], 3),
               bound_gbps=round(gbps, 1), step_bytes=int(step_bytes))
  return rec


# ----------------------------------------------------------------------------- trainers

def _train(env: Env, step, state, shardings, batch, frozen=None, frozen_shardings=None) -> dict[str, float]:
  """Times a donated ``compile_step`` step: each call feeds the returned state back in (``frozen``: the
  step's never-donated models, e.g. a reference policy)."""
  compiled = state_lib.compile_step(step, shardings, batch_shardings(env, batch), frozen_shardings, env.mesh)
  holder = [state]

  def once():
    holder[0], metrics = compiled(holder[0], batch, frozen)
    return metrics

  return bench(once, env.reps)


def _mesh_kwargs(make_step: Callable, env: Env) -> dict:
  """``mesh=env.mesh`` for a step maker that takes the mesh it is compiled for (older revisions do not)."""
  return {"mesh": env.mesh} if "mesh" in inspect.signature(make_step).parameters else {}


def _layout_kwargs(make_sampler: Callable, env: Env) -> dict:
  """``layout=`` the decode layout ``env.decode`` names (``config.sharding.decode``), for a sampler maker that
  takes one (older revisions do not)."""
  if "layout" not in inspect.signature(make_sampler).parameters:
    return {}
  from rlhf_jax.decode_layout import DecodeLayout
  return {"layout": DecodeLayout(env.mesh, env.rules, env.decode)}


def sft_step(env: Env) -> Record:
  """``make_lm_step`` + ``compile_step``: one AdamW step (lr 1e-4, wd 0, no clip) on sft_batch x sft_len tokens."""
  s = env.size
  graphdef, params, shardings = init_params(env, lambda r: Decoder(env.model, rngs=r), 0, "lm")
  tx = optimizer(1e-4, 0.0)
  state, state_sh = state_lib.create_train_state({"policy": params}, {"policy": tx}, {"policy": shardings},
                                                 env.mesh, seed=0)
  loss_mask = np.ones((s.sft_batch, s.sft_len), np.float32)
  loss_mask[:, 0] = 0
  batch = put_batch(env, {"tokens": random_tokens(env, (s.sft_batch, s.sft_len), 1),
                          "mask": np.ones((s.sft_batch, s.sft_len), np.int32), "loss_mask": loss_mask})
  n_params = count_params(params)
  make_step = library.make_lm_step()
  stats = _train(env, make_step(graphdef, tx, **_mesh_kwargs(make_step, env)), state, state_sh, batch)
  tokens_per_s = s.sft_batch * s.sft_len / stats["median_s"]
  # The peer's formula (6 N per token), and the same plus attention's score/mix products (12 L D T per token).
  flops = {"mfu": 6 * n_params, "mfu_attn": 6 * n_params + 12 * env.model.num_layers * env.model.d_model * s.sft_len}
  mfu = {k: round(f * tokens_per_s / (env.peak_gflops * 1e9), 3) if env.peak_gflops else None for k, f in flops.items()}
  return common("sft_step", env, tokens_per_s=round(tokens_per_s, 1), ms_per_step=round(1e3 * stats["median_s"], 2),
                **mfu, compile_s=round(stats["compile_s"], 2), n_params=n_params,
                mfu_formula="6 * n_params * tokens_per_s / matmul_peak.gflops_max")


def sft_step_long(env: Env) -> Record:
  """``sft_step``'s tokens as rows of the model's ``max_len``: causal attention in query blocks of
  ``model.attention_block`` (the default, ``blocked``) against one product over all keys (``dense``,
  attention_block 0); a library without blocks reports ``dense`` only. ``speedup``: blocked over dense."""
  s = env.size
  width = env.model.max_len
  rows = max(s.sft_batch * s.sft_len // width, shd.data_parallel_size(env.mesh, env.rules))
  arms = {"dense": dataclasses.replace(env.model, attention_block=0), "blocked": env.model} if hasattr(
      env.model, "attention_block") else {"dense": env.model}
  loss_mask = np.ones((rows, width), np.float32)
  loss_mask[:, 0] = 0
  batch = put_batch(env, {"tokens": random_tokens(env, (rows, width), 1), "mask": np.ones((rows, width), np.int32),
                          "loss_mask": loss_mask})
  graphdef, params, shardings = init_params(env, lambda r: Decoder(env.model, rngs=r), 0, "lm")
  tx = optimizer(1e-4, 0.0)
  record = {}
  for name, cfg in arms.items():
    arm_graphdef = nnx.graphdef(nnx.eval_shape(lambda c=cfg: Decoder(c, rngs=nnx.Rngs(0))))
    state, state_sh = state_lib.create_train_state({"policy": jax.tree.map(jnp.copy, params)}, {"policy": tx},
                                                   {"policy": shardings}, env.mesh, seed=0)
    make_step = library.make_lm_step()
    stats = _train(env, make_step(arm_graphdef, tx, **_mesh_kwargs(make_step, env)), state, state_sh, batch)
    record[f"{name}_tokens_per_s"] = round(rows * width / stats["median_s"], 1)
    record[f"{name}_ms_per_step"] = round(1e3 * stats["median_s"], 2)
    record[f"{name}_compile_s"] = round(stats["compile_s"], 2)
  if "blocked" in arms:
    record["speedup"] = round(record["blocked_tokens_per_s"] / record["dense_tokens_per_s"], 3)
    record["attention_block"] = env.model.attention_block
  return common("sft_step_long", env, **record, rows=rows, width=width)


def sft_step_varlen(env: Env) -> Record:
  """``sft_step`` on rows of varied real length (uniform in [sft_len / 8, sft_len / 2]) built at the full
  ``sft_len``: padded to it (``fixed``), cut by the library's length bucketing (``bucketed``,
  ``data.min_bucket_len`` 16, or sft_len / 4 at a smaller size) and packed into fewer rows of ``sft_len``
  (``packed``, ``data.pack_width``; a library without packing reports none). Throughput counts real tokens
  only; ``speedup`` and ``packed_speedup`` are against ``fixed``."""
  s = env.size
  graphdef, params, shardings = init_params(env, lambda r: Decoder(env.model, rngs=r), 0, "lm")
  tx = optimizer(1e-4, 0.0)
  lengths = np.random.default_rng(3).integers(max(s.sft_len // 8, 2), s.sft_len // 2 + 1, s.sft_batch)
  mask = (np.arange(s.sft_len)[None] < lengths[:, None]).astype(np.int32)
  loss_mask = mask.astype(np.float32)
  loss_mask[:, 0] = 0
  full = {"tokens": random_tokens(env, (s.sft_batch, s.sft_len), 1) * mask, "mask": mask, "loss_mask": loss_mask}
  real = int(mask.sum())
  record = {}
  trim = library.find("trim_texts", "rlhf_jax.data.bucketing")
  batches = {"fixed": full, "bucketed": trim(full, min(16, s.sft_len // 4))}
  try:
    packed = library.find("pack", "rlhf_jax.data.packing")(full, s.sft_len, 0)
    # Padded with empty rows to fit the data axes, as the stages' ``ctx.put`` does.
    batches["packed"] = shd.pad_batch(packed, shd.data_parallel_size(env.mesh, env.rules))[0]
  except ImportError:  # a library from before packing
    pass
  for name, batch in batches.items():
    state, state_sh = state_lib.create_train_state({"policy": jax.tree.map(jnp.copy, params)}, {"policy": tx},
                                                   {"policy": shardings}, env.mesh, seed=0)
    make_step = library.make_lm_step()
    step = make_step(graphdef, tx, **_mesh_kwargs(make_step, env))
    stats = _train(env, step, state, state_sh, put_batch(env, batch))
    record[f"{name}_width"] = int(batch["tokens"].shape[1])
    record[f"{name}_rows"] = int(batch["tokens"].shape[0])
    record[f"{name}_real_tokens_per_s"] = round(real / stats["median_s"], 1)
  record["speedup"] = round(record["bucketed_real_tokens_per_s"] / record["fixed_real_tokens_per_s"], 3)
  if "packed" in batches:
    record["packed_speedup"] = round(record["packed_real_tokens_per_s"] / record["fixed_real_tokens_per_s"], 3)
  return common("sft_step_varlen", env, **record, real_tokens=real, rows=s.sft_batch)


def reward_step(env: Env) -> Record:
  """``make_reward_step`` (ranking loss, K=2 = Bradley-Terry) + ``compile_step``: AdamW, clip 1.0, one
  [2 * rm_pairs, rm_len] forward."""
  s = env.size
  graphdef, params, shardings = init_params(
      env, lambda r: ScalarModel(env.model, reward_head_std(env.model), rngs=r), 0, "rm")
  tx = optimizer(1e-5, 1.0)
  state, state_sh = state_lib.create_train_state({"reward": params}, {"reward": tx}, {"reward": shardings},
                                                 env.mesh, seed=0)
  batch = put_batch(env, {"tokens": random_tokens(env, (s.rm_pairs, 2, s.rm_len), 1),
                          "mask": np.ones((s.rm_pairs, 2, s.rm_len), np.int32),
                          "ranks": np.tile(np.array([[0, 1]], np.int32), (s.rm_pairs, 1)),
                          "response_mask": np.ones((s.rm_pairs, 2), np.int32)})
  make_step = library.make_reward_step()
  step = make_step(graphdef, tx, "ranking", 0.0, **_mesh_kwargs(make_step, env))
  stats = _train(env, step, state, state_sh, batch)
  return common("reward_step", env, pairs_per_s=round(s.rm_pairs / stats["median_s"], 2),
                ms_per_step=round(1e3 * stats["median_s"], 2), compile_s=round(stats["compile_s"], 2))


def reward_step_kwise(env: Env) -> Record:
  """``reward_step`` on K-wise comparisons as InstructGPT trains them: rm_pairs / 2 prompts x K = 4 responses,
  each row a prompt of rm_len / 2 tokens then a response of rm_len / 2 (the same rows as ``reward_step``'s
  batch), with the prompt computed per row (``per_row``) and once per prompt (``shared``, the batch's
  ``prompt_mask`` as ``batching.comparison_batch`` builds it)."""
  s = env.size
  k, prompts, p = 4, max(s.rm_pairs // 2, 1), s.rm_len // 2
  graphdef, params, shardings = init_params(
      env, lambda r: ScalarModel(env.model, reward_head_std(env.model), rngs=r), 0, "rm")
  tx = optimizer(1e-5, 1.0)
  prompt = np.repeat(random_tokens(env, (prompts, 1, p), 1), k, axis=1)
  tokens = np.concatenate([prompt, random_tokens(env, (prompts, k, s.rm_len - p), 2)], axis=-1)
  batch = {"tokens": tokens, "mask": np.ones_like(tokens), "ranks": np.tile(np.arange(k, dtype=np.int32), (prompts, 1)),
           "response_mask": np.ones((prompts, k), np.int32)}
  record = {}
  for name, extra in (("per_row", {}), ("shared", {"prompt_mask": np.ones((prompts, p), np.int32)})):
    state, state_sh = state_lib.create_train_state({"reward": jax.tree.map(jnp.copy, params)}, {"reward": tx},
                                                   {"reward": shardings}, env.mesh, seed=0)
    make_step = library.make_reward_step()
    step = make_step(graphdef, tx, "ranking", 0.0, **_mesh_kwargs(make_step, env))
    stats = _train(env, step, state, state_sh, put_batch(env, {**batch, **extra}))
    record[f"{name}_ms_per_step"] = round(1e3 * stats["median_s"], 2)
  record["speedup"] = round(record["per_row_ms_per_step"] / record["shared_ms_per_step"], 3)
  return common("reward_step_kwise", env, **record, prompts=prompts, k=k, prompt_len=p, rows=prompts * k)


def _varlen_comparisons(env: Env, targets: bool = False) -> tuple[dict, dict]:
  """K-wise comparisons of varied real length as the reward and DPO stages build them: rm_pairs / 2 prompts x
  K = 4 responses, a left-padded prompt of rm_len / 2 columns (real length uniform in [rm_len / 8, rm_len / 2])
  then a right-padded response of rm_len / 2 (real length uniform in [rm_len / 16, rm_len / 2]).

  Returns (layouts, facts): layouts name -> (host batch, fill): ``shared``, the stages' default, cut to its
  bucket with each prompt computed once (``prompt_mask``); ``packed_1x`` and ``packed_2x``,
  ``packing.pack_comparisons`` into rows of one longest example (rm_len / 2 + K * rm_len / 2 tokens) and of two,
  cut to a bucket, with the response tokens' targets when ``targets`` (a library without packed comparisons
  gives ``shared`` only); fill: real tokens over the token slots the step computes."""
  s = env.size
  k, prompts, p = 4, max(s.rm_pairs // 2, 1), s.rm_len // 2
  r = s.rm_len - p
  rng = np.random.default_rng(5)
  prompt_len = rng.integers(max(p // 4, 1), p + 1, prompts)
  response_len = rng.integers(max(r // 8, 1), r + 1, (prompts, k))
  mask = np.zeros((prompts, k, s.rm_len), np.int32)
  mask[:, :, :p] = (np.arange(p)[None, :] >= p - prompt_len[:, None])[:, None, :]
  mask[:, :, p:] = np.arange(r)[None, None, :] < response_len[:, :, None]
  tokens = np.concatenate([np.repeat(random_tokens(env, (prompts, 1, p), 1), k, axis=1),
                           random_tokens(env, (prompts, k, r), 2)], axis=-1) * mask
  full = {"tokens": tokens, "mask": mask, "ranks": np.tile(np.arange(k, dtype=np.int32), (prompts, 1)),
          "response_mask": np.ones((prompts, k), np.int32), "prompt_mask": mask[:, 0, :p].copy()}
  smallest = min(16, s.rm_len // 8)
  fill = library.find("comparison_fill", "rlhf_jax.data.packing")
  # DPO splits rows at the prompt's width, so its batches keep it (``left=False``).
  shared = library.find("trim_pairs", "rlhf_jax.data.bucketing")(full, p, smallest, left=not targets)
  layouts = {"shared": (shared, fill(shared, shared["prompt_mask"].shape[1]))}
  try:
    rows = library.find("comparison_training_rows", "rlhf_jax.data.packing")
    for times in (1, 2):
      packed = rows(full, times * (p + k * r), 0, smallest, targets=targets)
      # Padded with empty rows to fit the data axes, as the stages' ``ctx.put`` does.
      layouts[f"packed_{times}x"] = (shd.pad_batch(packed, shd.data_parallel_size(env.mesh, env.rules))[0],
                                     float(packed["mask"].mean()))
  except ImportError:  # a library from before packed comparisons
    pass
  facts = dict(prompts=prompts, k=k, prompt_len=p, real_tokens=int(mask[:, 0, :p].sum() + mask[:, :, p:].sum()))
  return layouts, facts


def _layout_record(env: Env, layouts: dict, train_once: Callable) -> dict:
  """Per layout of ``_varlen_comparisons``: ms a step (``train_once(batch) -> _train stats``), fill, shape and
  the speedup against ``shared``."""
  record = {}
  for name, (batch, batch_fill) in layouts.items():
    stats = train_once(put_batch(env, batch))
    record[f"{name}_ms_per_step"] = round(1e3 * stats["median_s"], 2)
    record[f"{name}_fill"] = round(batch_fill, 3)  # of the rows before any padding to the data axes
    record[f"{name}_shape"] = list(np.shape(batch["tokens"]))
    if name != "shared":
      record[f"{name}_speedup"] = round(record["shared_ms_per_step"] / record[f"{name}_ms_per_step"], 3)
  return record


def reward_step_varlen(env: Env) -> Record:
  """``reward_step`` on ``_varlen_comparisons``: the stage's default layout against packed comparisons
  (``reward.pack_width``)."""
  layouts, facts = _varlen_comparisons(env)
  graphdef, params, shardings = init_params(
      env, lambda rngs: ScalarModel(env.model, reward_head_std(env.model), rngs=rngs), 0, "rm")
  tx = optimizer(1e-5, 1.0)

  def train_once(batch):
    state, state_sh = state_lib.create_train_state({"reward": jax.tree.map(jnp.copy, params)}, {"reward": tx},
                                                   {"reward": shardings}, env.mesh, seed=0)
    make_step = library.make_reward_step()
    return _train(env, make_step(graphdef, tx, "ranking", 0.0, **_mesh_kwargs(make_step, env)), state, state_sh,
                  batch)

  return common("reward_step_varlen", env, **_layout_record(env, layouts, train_once), **facts)


def dpo_step_varlen(env: Env) -> Record:
  """``dpo_step`` (reference pass in the step) on ``_varlen_comparisons``: the stage's default layout against
  packed comparisons (``dpo.pack_width``)."""
  layouts, facts = _varlen_comparisons(env, targets=True)
  graphdef, params, shardings = init_params(env, lambda r: Decoder(env.model, rngs=r), 0, "lm")
  reference = jax.tree.map(jnp.copy, params)
  tx = optimizer(1e-6, 1.0)
  dpo = library.find("make_dpo_step", "rlhf_jax.algorithms.dpo")
  settings = library.find("DPOSettings", "rlhf_jax.algorithms.dpo")(beta=0.1)
  sampling = SamplingConfig(max_new_tokens=env.size.rm_len - facts["prompt_len"], temperature=1.0)
  step = dpo(graphdef, tx, settings, facts["prompt_len"], sampling, **_mesh_kwargs(dpo, env))

  def train_once(batch):
    state, state_sh = state_lib.create_train_state({"policy": jax.tree.map(jnp.copy, params)}, {"policy": tx},
                                                   {"policy": shardings}, env.mesh, seed=0)
    return _train(env, step, state, state_sh, batch, {"reference": reference}, {"reference": shardings})

  return common("dpo_step_varlen", env, **_layout_record(env, layouts, train_once), **facts)


def dpo_step(env: Env) -> Record:
  """``make_dpo_step`` + ``compile_step``: one AdamW step (lr 1e-6, clip 1.0: TRL's DPO defaults; beta 0.1,
  sigmoid loss) on rm_pairs prompts of rm_len / 2 tokens, each with a chosen and a rejected response of
  rm_len / 2 (the same 2 * rm_pairs rows of rm_len as ``reward_step``): the policy's forward and backward
  and the frozen reference's forward, each computing a prompt once for its two responses. ``precomputed_*``:
  the same step on a batch carrying the reference's log-probs (``precompute_reference``), no reference pass."""
  s = env.size
  p = s.rm_len // 2
  graphdef, params, shardings = init_params(env, lambda r: Decoder(env.model, rngs=r), 0, "lm")
  reference = jax.tree.map(jnp.copy, params)
  tx = optimizer(1e-6, 1.0)
  state, state_sh = state_lib.create_train_state({"policy": params}, {"policy": tx}, {"policy": shardings},
                                                 env.mesh, seed=0)
  prompt = np.repeat(random_tokens(env, (s.rm_pairs, 1, p), 1), 2, axis=1)
  tokens = np.concatenate([prompt, random_tokens(env, (s.rm_pairs, 2, s.rm_len - p), 2)], axis=-1)
  batch = put_batch(env, {"tokens": tokens, "mask": np.ones_like(tokens),
                          "ranks": np.tile(np.array([[0, 1]], np.int32), (s.rm_pairs, 1)),
                          "response_mask": np.ones((s.rm_pairs, 2), np.int32)})
  dpo = library.find("make_dpo_step", "rlhf_jax.algorithms.dpo")
  settings = library.find("DPOSettings", "rlhf_jax.algorithms.dpo")(beta=0.1)
  sampling = SamplingConfig(max_new_tokens=s.rm_len - p, temperature=1.0)
  step = dpo(graphdef, tx, settings, p, sampling, **_mesh_kwargs(dpo, env))
  stats = _train(env, step, state, state_sh, batch, {"reference": reference}, {"reference": shardings})
  record = {}
  try:
    key = library.find("REFERENCE_KEY", "rlhf_jax.algorithms.dpo")
    table = library.find("make_reference_fn", "rlhf_jax.algorithms.dpo")(graphdef, p, sampling, False)(reference, batch)
    state, state_sh = state_lib.create_train_state({"policy": jax.tree.map(jnp.copy, reference)}, {"policy": tx},
                                                   {"policy": shardings}, env.mesh, seed=0)
    pre = _train(env, step, state, state_sh, {**batch, key: put_batch(env, np.asarray(table))},
                 {"reference": reference}, {"reference": shardings})
    record = {"precomputed_pairs_per_s": round(s.rm_pairs / pre["median_s"], 2),
              "precomputed_ms_per_step": round(1e3 * pre["median_s"], 2)}
  except ImportError:  # a library from before the precomputed reference
    pass
  return common("dpo_step", env, pairs_per_s=round(s.rm_pairs / stats["median_s"], 2),
                ms_per_step=round(1e3 * stats["median_s"], 2), compile_s=round(stats["compile_s"], 2), **record,
                pairs=s.rm_pairs, prompt_len=p, response_len=s.rm_len - p)


# ----------------------------------------------------------------------------- RL iteration

def _forward_timer(env: Env, fn: Callable, params, *args) -> float:
  """Median seconds of ``jit(fn)(params, *args)``: one model's forward pass, timed on its own."""
  f = jax.jit(fn)
  return bench(lambda: f(params, *args), env.reps)["median_s"]


def _rl_pipeline(env: Env, lm_gd, sc_gd, value_gd, reward, ref, sampling, pcfg, value_mode, prompt, prompt_mask):
  """The library's rollout -> score -> experience functions, as
  ``(rollout(params, key), score(rollout), experience(policy, value, rollout, score) -> Experience)``.

  Newer library: ``make_rollout_fn`` + ``RewardModelScorer`` + ``make_experience_fn(rollout, score)``;
  older: ``make_sampler`` + ``make_experience_fn`` that runs the reward model itself (score is None).
  """
  beta = jnp.float32(0.05)
  if library.rollout_api():
    from rlhf_jax import rollout as rollout_lib, scoring
    try:  # the sampler prefills each prompt once for its k samples, as the ppo stage asks (``ppo.share_prompt``)
      rollout_fn = rollout_lib.make_rollout_fn(lm_gd, sampling,
                                               env.size.rl_samples if getattr(pcfg, "share_prompt", False) else 1,
                                               **_layout_kwargs(rollout_lib.make_rollout_fn, env))
    except TypeError:  # a library from before the shared prefill
      rollout_fn = rollout_lib.make_rollout_fn(lm_gd, sampling)
    group = jnp.repeat(jnp.arange(env.size.rl_prompts, dtype=jnp.int32), env.size.rl_samples)
    scorer = scoring.RewardModelScorer(sc_gd, reward)
    if getattr(pcfg, "fuses_experience", False):  # the update finishes the experience (one minibatch)
      inputs_fn = library.ppo("make_experience_inputs_fn")(lm_gd, pcfg)
      exp_fn = lambda policy, ref_params, value, rollout, score, beta: (inputs_fn(ref_params, rollout, score),)  # noqa: E731
    else:
      exp_fn = library.ppo("make_experience_fn")(lm_gd, value_gd, pcfg, value_mode)
    try:  # as the ppo stage marks the rollout: k samples of a prompt share its pass (``ppo.share_prompt``)
      share = library.ppo("share_prompts")
    except ImportError:  # a library from before prompt sharing
      share = lambda rollout, cfg, k: rollout  # noqa: E731
    return (lambda params, key: share(rollout_fn(params, prompt, prompt_mask, group, key), pcfg, env.size.rl_samples),
            scorer,
            lambda policy, value, rollout, score: exp_fn(policy, ref, value, rollout, score, beta)[0])
  sampler = generate_lib.make_sampler(lm_gd, sampling)
  exp_fn = library.ppo("make_experience_fn")(lm_gd, value_gd, sc_gd, pcfg, value_mode)
  return (lambda params, key: sampler(params, prompt, prompt_mask, key), lambda rollout: None,
          lambda policy, value, sample, score: exp_fn(policy, ref, value, reward, prompt, prompt_mask, sample,
                                                      beta)[0])


def _full_sequence(rollout, prompt, prompt_mask):
  """(tokens, mask) [B, P + N] of a ``Rollout`` (newer library) or of prompt ++ ``Sample`` (older)."""
  if hasattr(rollout, "response"):
    return rollout.tokens, rollout.mask
  return jnp.concatenate([prompt, rollout.tokens], axis=1), jnp.concatenate([prompt_mask, rollout.mask], axis=1)


def rl_iter(env: Env, value_mode: str = "separate", old_log_probs: str = "teacher_forced",
            advantage: str = "gae", fuse: bool = True) -> Record:
  """One PPO iteration through the library: rollout (KV-cache sampler) -> reward-model score -> experience
  (policy, reference and value forwards, KL penalty beta 0.05, GAE) -> ``make_ppo_update`` under
  ``compile_step`` (1 epoch, 1 minibatch, clip 1.0).

  ``phases``: generate, reward, experience and update are the library's compiled functions each timed
  alone; reference and value are the forward passes inside ``experience``, timed as standalone model
  calls (value is 0 with a shared value head, and when the update finishes the experience: with one
  minibatch, ``ppo.fuse_experience``, whose record says ``fused_experience``; ``rl_iter_unfused`` turns it
  off, so experience runs the policy and value passes). ``old_log_probs="sampler"`` (``rl_iter_sampler_lp``) takes
  PPO's old log-probs from the rollout instead of a policy forward pass. ``advantage="rloo"``
  (``rl_iter_rloo``, value mode "none") is the peer's algorithm: no value model, the leave-one-out baseline.
  """
  s, cfg = env.size, env.model
  lm_gd, policy, policy_sh = init_params(env, lambda r: Decoder(cfg, rngs=r), 0, "lm")
  ref = jax.tree.map(jnp.copy, policy)
  sc_gd, reward, rm_sh = init_params(env, lambda r: ScalarModel(cfg, reward_head_std(cfg), rngs=r), 1, "rm")
  if value_mode == "separate":
    # A value model as PPO starts one from the reward model: its trunk, a zero head.
    value = {**jax.tree.map(jnp.copy, reward), "head": jnp.zeros_like(reward["head"]),
             "head_bias": jnp.zeros_like(reward["head_bias"])}
    value_sh = rm_sh
  elif value_mode == "none":
    value, value_sh = {}, {}
  else:
    rep = shd.replicated(env.mesh)
    value = jax.device_put(library.ppo("value_head_params")(cfg), rep)
    value_sh = jax.tree.map(lambda _: rep, value)
  value_gd = sc_gd if value_mode == "separate" else None

  sampling = SamplingConfig(max_new_tokens=s.rl_new, temperature=1.0, stop_at_eos=False)
  extra = {} if old_log_probs == "teacher_forced" else {"old_log_probs": old_log_probs}
  if advantage != "gae":
    extra["advantage"] = advantage
  if not fuse:
    extra["fuse_experience"] = False
  pcfg = library.ppo("PPOConfig")(sampling=sampling, epochs=1, minibatches=1, **extra)
  policy_tx, value_tx = optimizer(1e-6, 1.0), optimizer(1e-5, 1.0)
  state, state_sh = state_lib.create_train_state({"policy": policy, "value": value},
                                                 {"policy": policy_tx, "value": value_tx},
                                                 {"policy": policy_sh, "value": value_sh}, env.mesh, seed=0)
  rows = s.rl_prompts * s.rl_samples
  prompt = put_batch(env, np.repeat(random_tokens(env, (s.rl_prompts, s.rl_prompt), 1), s.rl_samples, axis=0))
  prompt_mask = put_batch(env, np.ones((rows, s.rl_prompt), np.int32))

  rollout_fn, score_fn, experience_fn = _rl_pipeline(env, lm_gd, sc_gd, value_gd, reward, ref, sampling, pcfg,
                                                     value_mode, prompt, prompt_mask)
  try:  # minibatch rows split over the mesh's data axes, as the ppo stage builds it
    update = library.ppo("make_ppo_update")(lm_gd, value_gd, policy_tx, value_tx, pcfg, value_mode, env.mesh,
                                            env.rules)
  except TypeError:  # a library from before the minibatch sharding
    update = library.ppo("make_ppo_update")(lm_gd, value_gd, policy_tx, value_tx, pcfg, value_mode)
  rollout0 = rollout_fn(policy, jax.random.key(0))
  exp0 = experience_fn(policy, value, rollout0, score_fn(rollout0))
  fused = bool(getattr(pcfg, "fuses_experience", False))
  exp_sh = batch_shardings(env, {"experience": exp0, "ptx": None})
  step = state_lib.compile_step(update, state_sh, exp_sh, None, env.mesh)
  holder = {"state": state, "i": 0}

  def as_step_expects(exp):
    # As the ppo stage does: on a mesh with data parallelism XLA may leave a row array replicated.
    return jax.device_put(exp, exp_sh["experience"])

  def iteration():
    st = holder["state"]
    holder["i"] += 1
    rollout = rollout_fn(st.params["policy"], jax.random.key(holder["i"]))
    exp = as_step_expects(experience_fn(st.params["policy"], st.params["value"], rollout, score_fn(rollout)))
    holder["state"], metrics = step(st, {"experience": exp, "ptx": None}, None)
    return metrics

  whole = bench(iteration, env.reps)

  def params(name):
    return holder["state"].params[name]

  rollout = rollout_fn(params("policy"), jax.random.key(0))
  score = score_fn(rollout)
  exp = as_step_expects(experience_fn(params("policy"), params("value"), rollout, score))
  tokens, mask = _full_sequence(rollout, prompt, prompt_mask)
  phases = {
      "generate": bench(lambda: rollout_fn(params("policy"), jax.random.key(0)), env.reps)["median_s"],
      "reward": (bench(lambda: score_fn(rollout), env.reps)["median_s"] if score is not None else
                 _forward_timer(env, lambda p, t, m: nnx.merge(sc_gd, p)(t, m), reward, tokens, mask)),
      "experience": bench(lambda: experience_fn(params("policy"), params("value"), rollout, score),
                          env.reps)["median_s"],
      "reference": _forward_timer(env, lambda p, t, m: nnx.merge(lm_gd, p)(t, m)[0], ref, tokens, mask),
      "value": (_forward_timer(env, lambda p, t, m: nnx.merge(sc_gd, p).values(t, m), params("value"), tokens, mask)
                if value_mode == "separate" and not fused else 0.0),
  }

  def update_once():
    holder["state"], metrics = step(holder["state"], {"experience": exp, "ptx": None}, None)
    return metrics

  phases["update"] = bench(update_once, env.reps)["median_s"]
  name = {"separate": "rl_iter", "shared": "rl_iter_shared", "none": f"rl_iter_{advantage}"}[value_mode]
  if old_log_probs != "teacher_forced":
    name += "_sampler_lp"
  if not fuse:
    name += "_unfused"
  return common(name, env, s_per_iter=round(whole["median_s"], 3), compile_s=round(whole["compile_s"], 2),
                phases={k: round(v, 4) for k, v in phases.items()}, value_mode=value_mode,
                old_log_probs=old_log_probs, fused_experience=fused, rows=rows,
                prompt_len=s.rl_prompt, new_tokens=s.rl_new)


BENCHMARKS: dict[str, Callable[[Env], Record]] = {
    "matmul_peak": matmul_peak,
    "mem_bandwidth": mem_bandwidth,
    "generate": generate,
    "generate_grouped": lambda env: generate(env, math.gcd(GROUPED_SAMPLES, env.size.gen_batch), "generate_grouped"),
    "generate_top_p": lambda env: generate(env, name="generate_top_p", top_p=0.9),
    "sft_step": sft_step,
    "sft_step_varlen": sft_step_varlen,
    "sft_step_long": sft_step_long,
    "reward_step": reward_step,
    "reward_step_kwise": reward_step_kwise,
    "reward_step_varlen": reward_step_varlen,
    "dpo_step_varlen": dpo_step_varlen,
    "dpo_step": dpo_step,
    "rl_iter": rl_iter,
    "rl_iter_shared": lambda env: rl_iter(env, "shared"),
    "rl_iter_sampler_lp": lambda env: rl_iter(env, "separate", "sampler"),
    "rl_iter_rloo": lambda env: rl_iter(env, "none", advantage="rloo"),
    "rl_iter_unfused": lambda env: rl_iter(env, fuse=False),
}
