"""Hugging Face GPT-2, Llama-family and Qwen2 checkpoints read into our decoder.

  model = rlhf_jax.models.hf.load("/models/gpt2")          # a Decoder with the checkpoint's weights
  logits = rlhf_jax.models.hf.forward(model, input_ids, attention_mask)   # [B, T, V] float32

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Only safetensors are read (nothing is unpickled), one tensor at a
time: each is converted to our layout on the host and placed straight into its shards on the mesh
(``rlhf_jax.sharding`` rules), so a model larger than one device loads onto a mesh of several.

Supported ``model_type``s: ``gpt2`` (our ``gpt2`` flavour) and ``llama`` / ``mistral`` / ``qwen2`` (our ``llama``
flavour: RMSNorm, SwiGLU, RoPE, grouped-query attention, tied or untied embeddings; ``qwen2`` adds biases on
the q, k and v projections, ``qkv_bias``). A ``*ForSequenceClassification`` checkpoint with one label loads as a
reward model (``ScalarModel``).

Positions come from the attention mask (``cumsum(mask) - 1``, as Hugging Face ``generate`` computes
them), so a left-padded row gives the logits of the unpadded one. Writing back: ``hf_export``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax import sharding
from rlhf_jax.models.decoder import Decoder, DecoderConfig, ScalarModel

# A stage input (``sft.init_from``, ``ppo.policy``, ...) of the form "hf:PATH" names a checkpoint directory.
HF_PREFIX = "hf:"
# model_type -> our flavour.
FLAVOURS = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
# Keys of ``config.model`` that a checkpoint fixes (the rest: dtypes, dropout, remat, scan_layers are the run's).
SHAPE_KEYS = ("flavour", "num_layers", "d_model", "num_heads", "num_kv_heads", "d_ff", "max_len", "rope_theta",
              "rope_scaling", "norm_eps", "tie_embeddings", "qkv_bias")
# config.json key where an exported reward model keeps the head bias Llama's score layer has no room for.
SCORE_BIAS_KEY = "rlhf_jax_score_bias"

Array = jax.Array


class HFError(ValueError):
  """A checkpoint directory that cannot be read into our decoder (the message says which file or tensor)."""


def hf_path(name: str) -> str | None:
  """The directory of a stage input "hf:PATH", or None for an instance name."""
  if isinstance(name, str) and name.startswith(HF_PREFIX):
    return os.path.expanduser(name[len(HF_PREFIX):])
  return None


# --- config.json <-> DecoderConfig ------------------------------------------------


def read_config(path: str) -> dict:
  """The checkpoint's ``config.json`` as a dict."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise HFError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
  with open(file) as f:
    return json.load(f)


def _rope(hf: Mapping[str, Any]) -> tuple[float, tuple]:
  """(RoPE base, our ``rope_scaling``) from ``rope_parameters`` (transformers >= 5) or the older
  ``rope_theta`` / ``rope_scaling`` keys."""
  params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  kind = params.get("rope_type") or params.get("type") or "default"
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  if kind == "default":
    return theta, ()
  if kind == "linear":
    return theta, ("linear", float(params["factor"]))
  if kind == "llama3":
    return theta, ("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                   float(params["high_freq_factor"]), int(_original_len(hf, params)))
  if kind == "yarn":
    return theta, _yarn(hf, params)
  raise HFError(f"RoPE scaling {kind!r} is not supported (supported: default, linear, llama3, yarn)")


def _yarn(hf: Mapping[str, Any], params: Mapping[str, Any]) -> tuple:
  """Our yarn ``rope_scaling`` with transformers' defaults filled in: beta_fast 32, beta_slow 1, truncate true,
  the attention factor from mscale / mscale_all_dim or 0.1 ln(factor) + 1, the factor (if null) from the
  context lengths, and a top-level original_max_position_embeddings before the nested one."""
  partial = params.get("partial_rotary_factor")
  partial = hf.get("partial_rotary_factor") if partial is None else partial
  if partial not in (None, 1.0):
    raise HFError(f"config.json RoPE yarn with partial_rotary_factor={partial!r} is not supported (our RoPE "
                  "rotates the whole head)")
  original = _original_len(hf, params)
  _positive("original_max_position_embeddings", original)
  if original != int(original):
    raise HFError(f"config.json RoPE yarn original_max_position_embeddings={original!r} is not a whole number")
  factor = params["factor"]
  if factor is None:
    factor = hf.get("max_position_embeddings", 2048) / original
  _positive("factor", factor)

  def get_mscale(m: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

  attention_factor = params.get("attention_factor")
  if attention_factor is None:
    mscale, all_dim = params.get("mscale"), params.get("mscale_all_dim")
    attention_factor = get_mscale(mscale) / get_mscale(all_dim) if mscale and all_dim else get_mscale(1.0)
  beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1
  for key, value in (("attention_factor", attention_factor), ("beta_fast", beta_fast), ("beta_slow", beta_slow)):
    _positive(key, value)
  return ("yarn", float(factor), int(original), float(beta_fast), float(beta_slow), float(attention_factor),
          bool(params.get("truncate", True)))


def _original_len(hf: Mapping[str, Any], params: Mapping[str, Any]) -> Any:
  """The pretraining context a RoPE scaling stretches: a top-level original_max_position_embeddings (as
  transformers reads it first), the scaling's own, else max_position_embeddings."""
  original = hf.get("original_max_position_embeddings")
  if original is None:
    original = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 2048)
  return original


def _positive(key: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
    raise HFError(f"config.json RoPE yarn {key}={value!r} is not supported (a number > 0 is needed)")


def decoder_config(hf: Mapping[str, Any], **runtime) -> DecoderConfig:
  """Our ``DecoderConfig`` for a checkpoint's ``config.json`` dict.

  ``runtime``: keys the checkpoint does not fix (``param_dtype``, ``dtype``, ``matmul_dtype``, ``dropout``,
  ``remat``, ``scan_layers``, ``attention_block``, ``attention_impl``). Settings our decoder cannot express raise ``HFError`` naming them.
  """
  model_type = hf.get("model_type")
  if model_type not in FLAVOURS:
    raise HFError(f"model_type {model_type!r} is not supported; supported: {', '.join(FLAVOURS)}")

  def need(condition: bool, what: str):
    if not condition:
      raise HFError(f"{model_type} checkpoint with {what} is not supported")

  try:
    values = _decoder_values(hf, model_type, need)
  except KeyError as e:
    raise HFError(f"{model_type} config.json has no {e.args[0]!r}") from e
  clash = sorted(set(runtime) & set(values))
  if clash:
    raise HFError(f"{clash} are fixed by the checkpoint's config.json, not run settings")
  try:
    return DecoderConfig(**values, **runtime)
  except ValueError as e:
    raise HFError(f"{model_type} config.json: {e}") from e


def _decoder_values(hf: Mapping[str, Any], model_type: str, need: Callable[[bool, str], None]) -> dict:
  """``DecoderConfig`` fields from a supported ``config.json``; ``need(ok, what)`` refuses what we cannot run."""
  if model_type == "gpt2":
    d, heads = hf["n_embd"], hf["n_head"]
    need(hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
         f"activation_function={hf.get('activation_function')!r} (tanh GELU only)")
    need(hf.get("scale_attn_weights", True), "scale_attn_weights=false")
    need(not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true")
    need(not hf.get("add_cross_attention", False), "add_cross_attention=true")
    values = dict(flavour="gpt2", vocab_size=hf["vocab_size"], num_layers=hf["n_layer"], d_model=d,
                  num_heads=heads, num_kv_heads=heads, d_ff=hf.get("n_inner") or 4 * d,
                  max_len=hf.get("n_positions", 1024), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                  tie_embeddings=hf.get("tie_word_embeddings", True))
  else:
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    need(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r} (silu only)")
    need(not hf.get("attention_bias", False), "attention_bias=true")
    need(not hf.get("mlp_bias", False), "mlp_bias=true")
    need(hf.get("pretraining_tp", 1) == 1, f"pretraining_tp={hf.get('pretraining_tp')}")
    head_dim = hf.get("head_dim") or d // heads
    need(head_dim * heads == d, f"head_dim={head_dim} != hidden_size/num_attention_heads={d / heads:g}")
    max_len = hf.get("max_position_embeddings", 2048)
    if model_type == "qwen2":
      _check_qwen2_window(hf, max_len, need)
    else:
      window = hf.get("sliding_window")
      need(window is None or window >= max_len, f"sliding_window={window} < max_position_embeddings={max_len}")
    values = dict(flavour="llama", vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], d_model=d,
                  num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                  d_ff=hf["intermediate_size"], max_len=max_len, norm_eps=hf.get("rms_norm_eps", 1e-6),
                  tie_embeddings=hf.get("tie_word_embeddings", False), qkv_bias=model_type == "qwen2")
    values["rope_theta"], values["rope_scaling"] = _rope(hf)
  return values


def _check_qwen2_window(hf: Mapping[str, Any], max_len: int, need: Callable[[bool, str], None]) -> None:
  """Refuses a Qwen2 checkpoint whose layers attend through a window shorter than the context.

  ``sliding_window`` counts only under ``use_sliding_window`` (transformers drops it otherwise, and released
  Qwen2 configs carry a window with the switch off); it covers the layers ``layer_types`` marks
  "sliding_attention", or without that key, layers ``max_window_layers`` and up.
  """
  window = hf.get("sliding_window")
  if not hf.get("use_sliding_window", False) or window is None or window >= max_len:
    return
  layers = hf["num_hidden_layers"]
  types = hf.get("layer_types")
  if types:
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
  else:
    sliding = list(range(hf.get("max_window_layers", 28), layers))  # 28: transformers' default
  need(not sliding, f"config.json use_sliding_window=true and sliding_window={window} < "
       f"max_position_embeddings={max_len} (layers {sliding} attend through the window; our attention is full)")


def is_reward_checkpoint(path: str) -> bool:
  """Whether the checkpoint is a ``*ForSequenceClassification`` model (a reward model, read as ``"scalar"``)."""
  return any(a.endswith("ForSequenceClassification") for a in read_config(path).get("architectures") or ())


def model_config_values(path: str) -> dict:
  """The ``config.model`` keys a checkpoint fixes (``SHAPE_KEYS`` and ``vocab_size``), for config files."""
  cfg = decoder_config(read_config(path))
  return {k: getattr(cfg, k) for k in ("vocab_size", *SHAPE_KEYS)}


def check_shape_keys(model: Mapping[str, Any], hf_cfg: DecoderConfig, source: str) -> None:
  """Raises ``HFError`` listing every ``config.model`` shape key that disagrees with the checkpoint."""
  ours = DecoderConfig(**{**{k: v for k, v in model.items() if k in SHAPE_KEYS},
                          "vocab_size": hf_cfg.vocab_size})
  wrong = [f"model.{k}={getattr(ours, k)!r} (checkpoint: {getattr(hf_cfg, k)!r})"
           for k in SHAPE_KEYS if k != "num_kv_heads" and getattr(ours, k) != getattr(hf_cfg, k)]
  if ours.kv_heads != hf_cfg.kv_heads:
    wrong.append(f"model.num_kv_heads={ours.num_kv_heads} (checkpoint: {hf_cfg.kv_heads})")
  if wrong:
    raise HFError(f"config.model does not match {source}/config.json: {'; '.join(wrong)}. A run from a "
                  "Hugging Face checkpoint takes the model shape from it: set these keys (configs/quickstart.py:"
                  "hf=PATH does, from rlhf_jax.models.hf.model_config_values(PATH))")


# --- reading safetensors ------------------------------------------------------------


class SafetensorsReader:
  """Tensors of a checkpoint directory by name, read one at a time (numpy, never unpickled)."""

  # Hugging Face keys are "transformer."/"model."-prefixed in *LMHeadModel/*ForCausalLM files and bare in
  # files of the base model class; either is accepted.
  PREFIXES = ("transformer.", "model.")

  def __init__(self, path: str):
    from safetensors import safe_open  # an optional extra: pip install rlhf-jax[hf]

    self.path = path
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    elif os.path.isfile(single):
      weight_map = None
    else:
      found = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
      hint = f" (found {found}: pickled weights are never read; re-save with safe_serialization)" if found else ""
      raise HFError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    self._files = {}
    if weight_map is None:
      handle = safe_open(single, framework="numpy")
      self._files[single] = handle
      self._where = {k: single for k in handle.keys()}
    else:
      self._where = {k: os.path.join(path, v) for k, v in weight_map.items()}
    self._open = safe_open
    self._last: tuple[str | None, np.ndarray | None] = (None, None)

  def names(self) -> list[str]:
    return sorted(self._where)

  def resolve(self, name: str) -> str | None:
    """The stored key for ``name`` (with or without its model-class prefix), or None."""
    if name in self._where:
      return name
    for prefix in self.PREFIXES:
      if name.startswith(prefix) and name[len(prefix):] in self._where:
        return name[len(prefix):]
    return None

  def shape(self, name: str) -> tuple[int, ...] | None:
    key = self.resolve(name)
    if key is None:
      return None
    return tuple(self._handle(key).get_slice(key).get_shape())

  def get(self, name: str, expected_shape: Sequence[int]) -> np.ndarray:
    """Tensor ``name`` as numpy, checked against ``expected_shape``."""
    key = self.resolve(name)
    if key is None:
      raise HFError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
    shape = tuple(self._handle(key).get_slice(key).get_shape())
    if shape != tuple(expected_shape):
      raise HFError(f"{self.path}: tensor {name!r} has shape {shape}, but config.json implies "
                    f"{tuple(expected_shape)}")
    if self._last[0] != key:  # GPT-2's fused QKV tensor serves three of our params in a row
      self._last = (key, self._handle(key).get_tensor(key))
    return self._last[1]

  def _handle(self, key: str):
    file = self._where[key]
    if file not in self._files:
      if not os.path.isfile(file):
        raise HFError(f"{self.path}: shard {os.path.basename(file)} (listed for tensor {key!r}) is missing")
      self._files[file] = self._open(file, framework="numpy")
    return self._files[file]

  def close(self) -> None:
    for handle in self._files.values():
      exit_ = getattr(handle, "__exit__", None)
      if exit_ is not None:
        exit_(None, None, None)
    self._files.clear()
    self._last = (None, None)

  def __enter__(self) -> "SafetensorsReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --- the tensor mapping --------------------------------------------------------------
#
# Each entry: our param path (inside the trunk's block for per-layer entries) -> (Hugging Face tensor name,
# its shape, from_hf(tensor) -> our array). ``hf_export`` inverts the same names and shapes.

Spec = tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def block_specs(cfg: DecoderConfig, i: int) -> dict[tuple[str, ...], Spec]:
  """Layer ``i``: our path inside a block -> (HF name, HF shape, converter)."""
  d, h, kv, hd, f = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.d_ff
  if cfg.flavour == "gpt2":
    p = f"transformer.h.{i}."
    qkv = (p + "attn.c_attn.weight", (d, 3 * d))
    qkv_b = (p + "attn.c_attn.bias", (3 * d,))
    return {
        ("norm_attn", "scale"): (p + "ln_1.weight", (d,), lambda x: x),
        ("norm_attn", "bias"): (p + "ln_1.bias", (d,), lambda x: x),
        ("attn", "wq"): (*qkv, lambda x: x[:, :d].reshape(d, h, hd)),
        ("attn", "wk"): (*qkv, lambda x: x[:, d:2 * d].reshape(d, h, hd)),
        ("attn", "wv"): (*qkv, lambda x: x[:, 2 * d:].reshape(d, h, hd)),
        ("attn", "bq"): (*qkv_b, lambda x: x[:d].reshape(h, hd)),
        ("attn", "bk"): (*qkv_b, lambda x: x[d:2 * d].reshape(h, hd)),
        ("attn", "bv"): (*qkv_b, lambda x: x[2 * d:].reshape(h, hd)),
        ("attn", "wo"): (p + "attn.c_proj.weight", (d, d), lambda x: x.reshape(h, hd, d)),
        ("attn", "bo"): (p + "attn.c_proj.bias", (d,), lambda x: x),
        ("norm_mlp", "scale"): (p + "ln_2.weight", (d,), lambda x: x),
        ("norm_mlp", "bias"): (p + "ln_2.bias", (d,), lambda x: x),
        ("mlp", "w_in"): (p + "mlp.c_fc.weight", (d, f), lambda x: x),
        ("mlp", "b_in"): (p + "mlp.c_fc.bias", (f,), lambda x: x),
        ("mlp", "w_out"): (p + "mlp.c_proj.weight", (f, d), lambda x: x),
        ("mlp", "b_out"): (p + "mlp.c_proj.bias", (d,), lambda x: x),
    }
  p = f"model.layers.{i}."
  # torch Linear weights are [out, in]; ours are [in, ...].
  specs = {
      ("norm_attn", "scale"): (p + "input_layernorm.weight", (d,), lambda x: x),
      ("attn", "wq"): (p + "self_attn.q_proj.weight", (h * hd, d), lambda x: x.T.reshape(d, h, hd)),
      ("attn", "wk"): (p + "self_attn.k_proj.weight", (kv * hd, d), lambda x: x.T.reshape(d, kv, hd)),
      ("attn", "wv"): (p + "self_attn.v_proj.weight", (kv * hd, d), lambda x: x.T.reshape(d, kv, hd)),
      ("attn", "wo"): (p + "self_attn.o_proj.weight", (d, h * hd), lambda x: x.T.reshape(h, hd, d)),
      ("norm_mlp", "scale"): (p + "post_attention_layernorm.weight", (d,), lambda x: x),
      ("mlp", "w_gate"): (p + "mlp.gate_proj.weight", (f, d), lambda x: x.T),
      ("mlp", "w_in"): (p + "mlp.up_proj.weight", (f, d), lambda x: x.T),
      ("mlp", "w_out"): (p + "mlp.down_proj.weight", (d, f), lambda x: x.T),
  }
  if cfg.qkv_bias:
    specs[("attn", "bq")] = (p + "self_attn.q_proj.bias", (h * hd,), lambda x: x.reshape(h, hd))
    specs[("attn", "bk")] = (p + "self_attn.k_proj.bias", (kv * hd,), lambda x: x.reshape(kv, hd))
    specs[("attn", "bv")] = (p + "self_attn.v_proj.bias", (kv * hd,), lambda x: x.reshape(kv, hd))
  return specs


def top_specs(cfg: DecoderConfig, kind: str) -> dict[tuple[str, ...], Spec]:
  """Non-layer params of a ``"lm"`` (Decoder) or ``"scalar"`` (ScalarModel) -> (HF name, HF shape, converter)."""
  d, v = cfg.d_model, cfg.vocab_size
  ident = lambda x: x  # noqa: E731
  if cfg.flavour == "gpt2":
    specs = {("trunk", "embed"): ("transformer.wte.weight", (v, d), ident),
             ("trunk", "pos_embed"): ("transformer.wpe.weight", (cfg.max_len, d), ident),
             ("trunk", "final_norm", "scale"): ("transformer.ln_f.weight", (d,), ident),
             ("trunk", "final_norm", "bias"): ("transformer.ln_f.bias", (d,), ident)}
  else:
    specs = {("trunk", "embed"): ("model.embed_tokens.weight", (v, d), ident),
             ("trunk", "final_norm", "scale"): ("model.norm.weight", (d,), ident)}
  if kind == "lm" and not cfg.tie_embeddings:
    specs[("lm_head",)] = ("lm_head.weight", (v, d), lambda x: x.T)
  if kind == "scalar":
    specs[("head",)] = ("score.weight", (1, d), lambda x: x[0])
  return specs


def abstract_params(cfg: DecoderConfig, kind: str) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract state) of a ``"lm"`` Decoder or ``"scalar"`` ScalarModel of ``cfg``."""
  if kind == "lm":
    make = lambda: Decoder(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  elif kind == "scalar":
    make = lambda: ScalarModel(cfg, 0.0, rngs=nnx.Rngs(0))  # noqa: E731
  else:
    raise ValueError(f"kind must be 'lm' or 'scalar', got {kind!r}")
  return nnx.split(nnx.eval_shape(make))


def read_params(path: str, cfg: DecoderConfig, kind: str = "lm", mesh: Mesh | None = None,
                rules: Iterable[Sequence[Any]] = sharding.DEFAULT_RULES, hf: Mapping[str, Any] | None = None,
                ) -> dict:
  """The params (plain nested dict, as ``nnx.State.to_pure_dict``) of a checkpoint, placed in their shards.

  Each tensor is read, converted to our layout and dtype on the host and handed to each device as its
  shard only (``jax.make_array_from_callback``); the host holds one tensor (one stacked [L, ...] tensor
  with ``scan_layers``) at a time. ``kind`` "scalar" reads a one-label ``*ForSequenceClassification``
  checkpoint's ``score`` as the reward head.
  """
  hf = read_config(path) if hf is None else hf
  mesh = sharding.make_mesh({"fsdp": -1}) if mesh is None else mesh
  _, abstract = abstract_params(cfg, kind)
  shardings = sharding.state_shardings(abstract, mesh, tuple(rules))
  targets = abstract.to_pure_dict()
  shardings = nnx.State(shardings).to_pure_dict()
  tops = top_specs(cfg, kind)
  blocks = [block_specs(cfg, i) for i in range(cfg.num_layers)]
  if kind == "scalar":
    architectures = hf.get("architectures") or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
      raise HFError(f"{path} holds a {architectures[0]}, not a reward model (a *ForSequenceClassification "
                    "checkpoint with one label)")
    labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 1
    if labels != 1:
      raise HFError(f"{path}: a reward model needs a sequence-classification head with 1 label, not {labels}")

  def host_value(keys: tuple) -> np.ndarray:
    if keys[:2] == ("trunk", "blocks"):
      rest = keys[2:]
      if cfg.scan_layers:  # stacked [L, ...]
        return np.stack([_read(reader, blocks[i][rest]) for i in range(cfg.num_layers)])
      return _read(reader, blocks[rest[0]][rest[1:]])
    if keys == ("head_bias",):
      return np.asarray(hf.get(SCORE_BIAS_KEY, 0.0), np.float32)
    if keys not in tops:
      raise HFError(f"no checkpoint tensor maps to our parameter {'/'.join(map(str, keys))}")
    return _read(reader, tops[keys])

  def place(keys: tuple, target, where) -> Array:
    value = np.asarray(host_value(keys), dtype=target.dtype)
    if value.shape != target.shape:  # a mapping bug, not a user error
      raise AssertionError(f"{keys}: converted shape {value.shape} != {target.shape}")
    return jax.make_array_from_callback(target.shape, where, lambda index: value[index])

  with SafetensorsReader(path) as reader:
    return _map_with_keys(place, targets, shardings)


def _read(reader: SafetensorsReader, spec: Spec) -> np.ndarray:
  name, shape, convert = spec
  return convert(reader.get(name, shape))


def _map_with_keys(fn, tree: dict, other: dict, prefix: tuple = ()) -> dict:
  """Like ``jax.tree.map`` over two nested dicts, passing each leaf's key path (plain keys, ints kept)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out[key] = _map_with_keys(fn, value, other[key], prefix + (key,))
    else:
      out[key] = fn(prefix + (key,), value, other[key])
  return out


# --- the public entry points ------------------------------------------------------------


def load(path: str, *, kind: str = "lm", mesh: Mesh | None = None,
         rules: Iterable[Sequence[Any]] = sharding.DEFAULT_RULES, param_dtype: Any = "float32",
         dtype: Any = "float32", scan_layers: bool = False, remat: bool = False) -> nnx.Module:
  """A ``Decoder`` (``kind="lm"``) or reward ``ScalarModel`` (``"scalar"``) with a checkpoint's weights.

  ``mesh``: where the params go (default: all devices along ``fsdp``), split as ``rules`` say.
  ``model(input_ids, attention_mask)`` returns ``(logits [B, T, V] float32, None)``; ``forward`` returns
  the logits alone.
  """
  hf = read_config(path)
  cfg = decoder_config(hf, param_dtype=param_dtype, dtype=dtype, scan_layers=scan_layers, remat=remat)
  graphdef, abstract = abstract_params(cfg, kind)
  params = read_params(path, cfg, kind, mesh, rules, hf)
  abstract.replace_by_pure_dict(params)
  return nnx.merge(graphdef, abstract)


def forward(model: nnx.Module, input_ids: Any, attention_mask: Any = None) -> Array:
  """Logits [B, T, V] (float32) of a ``Decoder`` for ``input_ids`` [B, T] (``attention_mask`` 1 = real token,
  default all ones; left or right padding)."""
  input_ids = jnp.asarray(input_ids, jnp.int32)
  mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  logits, _ = model(input_ids, mask)
  return logits
