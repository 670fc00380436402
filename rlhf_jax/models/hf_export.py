"""Our decoder and reward model written as Hugging Face checkpoints (``config.json`` + safetensors).

A policy becomes ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` with ``qkv_bias``); a reward
model (``ScalarModel``) becomes ``GPT2ForSequenceClassification`` / ``LlamaForSequenceClassification`` (``Qwen2...``)
with one label, whose ``score`` is our head. Their score layer has no bias: for GPT-2 our head bias is folded into
the final LayerNorm's bias (exact: that hidden state feeds only the score); RMSNorm has no bias, so for the others
it is recorded in ``config.json`` under ``rlhf_jax_score_bias`` (add it to the model's scores; ``hf.load`` reads it
back).

The tensor names and shapes are those ``rlhf_jax.models.hf`` reads, so export then import is exact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Iterator

import jax
import numpy as np

from rlhf_jax.atomic_file import write_atomic
from rlhf_jax.models.decoder import DecoderConfig
from rlhf_jax.models.hf import SCORE_BIAS_KEY, HFError, block_specs, top_specs

# Tokenizer files copied from a source checkpoint directory, when the run's tokenizer came from one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
DEFAULT_SHARD_BYTES = 5 << 30


def _host(x: Any) -> np.ndarray:
  """A (possibly sharded, possibly multi-host) array as one numpy array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _architecture(cfg: DecoderConfig, kind: str) -> str:
  family = "GPT2" if cfg.flavour == "gpt2" else ("Qwen2" if cfg.qkv_bias else "Llama")
  return f"{family}LMHeadModel" if (kind == "lm" and family == "GPT2") else (
      f"{family}ForCausalLM" if kind == "lm" else f"{family}ForSequenceClassification")


def hf_config(cfg: DecoderConfig, kind: str = "lm", *, bos_id: int | None = None, eos_id: int | None = None,
              pad_id: int | None = None, dtype: str = "float32") -> dict:
  """The ``config.json`` dict for ``cfg`` (a policy, ``kind="lm"``, or a reward model, ``"scalar"``)."""
  ids = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
  common = {"architectures": [_architecture(cfg, kind)], "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": bool(cfg.tie_embeddings), "dtype": dtype, "torch_dtype": dtype, **ids}
  if kind == "scalar":
    common.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, problem_type="regression")
  if cfg.flavour == "gpt2":
    if cfg.kv_heads != cfg.num_heads:
      raise HFError(f"GPT-2 has no grouped-query attention: num_kv_heads={cfg.kv_heads} != "
                    f"num_heads={cfg.num_heads} cannot be written as a gpt2 checkpoint")
    return {"model_type": "gpt2", "n_positions": cfg.max_len, "n_embd": cfg.d_model, "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads, "n_inner": cfg.d_ff, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "summary_first_dropout": 0.0, "scale_attn_weights": True, **common}
  llama = {"hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
           "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
           "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
           "rope_theta": cfg.rope_theta, "rope_parameters": _rope_parameters(cfg), **common}
  if cfg.qkv_bias:  # Qwen2: the q/k/v biases are part of the architecture, not a config key
    return {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": cfg.num_layers, **llama}
  return {"model_type": "llama", "attention_bias": False, "mlp_bias": False, **llama}


def _rope_parameters(cfg: DecoderConfig) -> dict:
  params = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling:
    params.update(rope_type=cfg.rope_scaling[0], factor=cfg.rope_scaling[1])
  if cfg.rope_scaling and cfg.rope_scaling[0] == "llama3":
    params.update(low_freq_factor=cfg.rope_scaling[2], high_freq_factor=cfg.rope_scaling[3],
                  original_max_position_embeddings=cfg.rope_scaling[4])
  if cfg.rope_scaling and cfg.rope_scaling[0] == "yarn":
    # Every value explicit (the attention factor too), so transformers' defaults never come into play.
    params.update(zip(("original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                       "truncate"), cfg.rope_scaling[2:]))
  return params


def _block(params: dict, cfg: DecoderConfig, i: int) -> dict:
  blocks = params["trunk"]["blocks"]
  if cfg.scan_layers:
    return jax.tree.map(lambda x: _host(x[i]), blocks)
  return jax.tree.map(_host, blocks[i])


def block_tensors(cfg: DecoderConfig, block: dict, i: int) -> dict[str, np.ndarray]:
  """Layer ``i``'s Hugging Face tensors from our block params (host arrays): the inverse of ``block_specs``."""
  d, f = cfg.d_model, cfg.d_ff
  a, m = block["attn"], block["mlp"]
  if cfg.flavour == "gpt2":
    p = f"transformer.h.{i}."
    return {p + "ln_1.weight": block["norm_attn"]["scale"], p + "ln_1.bias": block["norm_attn"]["bias"],
            p + "attn.c_attn.weight": np.concatenate([a[k].reshape(d, -1) for k in ("wq", "wk", "wv")], axis=1),
            p + "attn.c_attn.bias": np.concatenate([a[k].reshape(-1) for k in ("bq", "bk", "bv")]),
            p + "attn.c_proj.weight": a["wo"].reshape(-1, d), p + "attn.c_proj.bias": a["bo"],
            p + "ln_2.weight": block["norm_mlp"]["scale"], p + "ln_2.bias": block["norm_mlp"]["bias"],
            p + "mlp.c_fc.weight": m["w_in"], p + "mlp.c_fc.bias": m["b_in"],
            p + "mlp.c_proj.weight": m["w_out"], p + "mlp.c_proj.bias": m["b_out"]}
  p = f"model.layers.{i}."
  out = {p + "input_layernorm.weight": block["norm_attn"]["scale"],
         p + "self_attn.q_proj.weight": a["wq"].reshape(d, -1).T,
         p + "self_attn.k_proj.weight": a["wk"].reshape(d, -1).T,
         p + "self_attn.v_proj.weight": a["wv"].reshape(d, -1).T,
         p + "self_attn.o_proj.weight": a["wo"].reshape(-1, d).T,
         p + "post_attention_layernorm.weight": block["norm_mlp"]["scale"],
         p + "mlp.gate_proj.weight": m["w_gate"].T, p + "mlp.up_proj.weight": m["w_in"].T,
         p + "mlp.down_proj.weight": m["w_out"].reshape(f, d).T}
  if cfg.qkv_bias:
    out.update({p + f"self_attn.{n}_proj.bias": a[f"b{n}"].reshape(-1) for n in "qkv"})
  return out


def top_tensors(cfg: DecoderConfig, params: dict, kind: str) -> tuple[dict[str, np.ndarray], float]:
  """Non-layer Hugging Face tensors -> (tensors, score bias left over for config.json; 0 when folded)."""
  trunk = params["trunk"]
  out = {}
  for keys, (name, _, _) in top_specs(cfg, kind).items():
    value = params
    for k in keys:
      value = value[k]
    value = _host(value)
    out[name] = value.T if keys == ("lm_head",) else (value[None] if keys == ("head",) else value)
  leftover = 0.0
  if kind == "scalar":
    bias = float(_host(params["head_bias"]))
    head = _host(params["head"]).astype(np.float64)
    norm2 = float(head @ head)
    if bias and cfg.flavour == "gpt2" and norm2 > 0:
      # score = w . (LN(x) * s + b) + c = w . (LN(x) * s + b + c w / |w|^2): exact, LN's output feeds only the score.
      ln_bias = _host(trunk["final_norm"]["bias"])
      out["transformer.ln_f.bias"] = (ln_bias.astype(np.float64) + bias * head / norm2).astype(ln_bias.dtype)
    else:
      leftover = bias
  return out, leftover


def hf_tensors(cfg: DecoderConfig, params: dict, kind: str = "lm") -> tuple[Iterator[tuple[str, np.ndarray]], float]:
  """(name, tensor) of the whole checkpoint, one layer at a time, and the score bias left for config.json."""
  top, leftover = top_tensors(cfg, params, kind)

  def tensors():
    yield from top.items()
    for i in range(cfg.num_layers):
      yield from block_tensors(cfg, _block(params, cfg, i), i).items()

  return tensors(), leftover


def _expected_shapes(cfg: DecoderConfig, kind: str) -> dict[str, tuple[int, ...]]:
  shapes = {name: shape for name, shape, _ in top_specs(cfg, kind).values()}
  for i in range(cfg.num_layers):
    shapes.update({name: shape for name, shape, _ in block_specs(cfg, i).values()})
  return shapes


def save(out: str, cfg: DecoderConfig, params: dict, kind: str = "lm", *, tokenizer: Any = None,
         tokenizer_dir: str | None = None, dtype: str | None = None,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
  """Writes ``out/config.json`` and ``out/model.safetensors`` (or shards plus ``model.safetensors.index.json``).

  params: a ``Decoder`` (``kind="lm"``) or ``ScalarModel`` (``"scalar"``) state as a plain dict.
  tokenizer: our tokenizer object (its bos/eos/pad ids go into config.json); tokenizer_dir: a checkpoint
  directory whose tokenizer files are copied (the run's tokenizer came from there). Without one, a
  sentencepiece ``.model`` tokenizer is copied as ``tokenizer.model``. dtype: "float32", "bfloat16" or
  "float16" (default: the params' dtype). Returns the files written.
  """
  from safetensors.numpy import save_file  # an optional extra: pip install rlhf-jax[hf]

  os.makedirs(out, exist_ok=True)
  dtype = dtype or str(np.dtype(cfg.param_dtype))
  np_dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}.get(dtype)
  if np_dtype is None:
    raise HFError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
  ids = {}
  if tokenizer is not None:
    ids = {"bos_id": _id(tokenizer.bos_id), "eos_id": _id(tokenizer.eos_id), "pad_id": _id(tokenizer.pad_id)}
  config = hf_config(cfg, kind, dtype=dtype, **ids)
  tensors, leftover = hf_tensors(cfg, params, kind)
  if leftover:
    config[SCORE_BIAS_KEY] = leftover
    logging.warning("%s has no score bias: the reward model's bias %.6g is recorded in config.json as %s; "
                    "add it to the model's scores", config["architectures"][0], leftover, SCORE_BIAS_KEY)
  expected = _expected_shapes(cfg, kind)
  files, shard, shard_bytes, weight_map = [], {}, 0, {}

  def flush():
    nonlocal shard, shard_bytes
    if shard:
      name = f"model-{len(files) + 1:05d}.safetensors"
      save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
      weight_map.update({k: name for k in shard})
      files.append(name)
      shard, shard_bytes = {}, 0

  for name, value in tensors:
    value = np.ascontiguousarray(np.asarray(value).astype(np_dtype))
    if value.shape != expected[name]:  # a mapping bug, not a user error
      raise AssertionError(f"{name}: {value.shape} != {expected[name]}")
    if shard and shard_bytes + value.nbytes > max_shard_bytes:
      flush()
    shard[name] = value
    shard_bytes += value.nbytes
  flush()
  if len(files) == 1:
    os.replace(os.path.join(out, files[0]), os.path.join(out, "model.safetensors"))
    files = ["model.safetensors"]
  else:
    renamed = {}
    for i, name in enumerate(files):
      new = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
      os.replace(os.path.join(out, name), os.path.join(out, new))
      renamed[name] = new
    weight_map = {k: renamed[v] for k, v in weight_map.items()}
    total = sum(os.path.getsize(os.path.join(out, f)) for f in renamed.values())
    write_atomic(os.path.join(out, "model.safetensors.index.json"),
                 json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    files = [*renamed.values(), "model.safetensors.index.json"]
  write_atomic(os.path.join(out, "config.json"), json.dumps(config, indent=2, sort_keys=True))
  files.append("config.json")
  files += copy_tokenizer(out, tokenizer, tokenizer_dir)
  return files


def _id(value: Any) -> int | None:
  return None if value is None or int(value) < 0 else int(value)


def copy_tokenizer(out: str, tokenizer: Any = None, tokenizer_dir: str | None = None) -> list[str]:
  """Copies the tokenizer files of ``tokenizer_dir`` (or a sentencepiece tokenizer's ``.model``) to ``out``."""
  copied = []
  if tokenizer_dir:
    for name in TOKENIZER_FILES:
      src = os.path.join(tokenizer_dir, name)
      if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out, name)):
        shutil.copyfile(src, os.path.join(out, name))
        copied.append(name)
  elif tokenizer is not None and str(getattr(tokenizer, "path", "")).endswith(".model"):
    shutil.copyfile(tokenizer.path, os.path.join(out, "tokenizer.model"))
    copied.append("tokenizer.model")
  return copied
