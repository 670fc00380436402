"""The default config: the whole InstructGPT pipeline on the built-in default task, and model presets.

Config files in ``configs/`` start from ``base_config()`` and change what
their experiment needs. Each stage kind's keys are defined next to the code
that reads them (``*_config()`` in its module); this file only assembles
them into the default chain of instances and holds the run-wide groups
(seed, mesh, model, task, data).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from rlhf_jax.algorithms.dpo import dpo_config
from rlhf_jax.algorithms.lm import pretrain_config, sft_config
from rlhf_jax.algorithms.ppo import ppo_config
from rlhf_jax.algorithms.reward import reward_config
from rlhf_jax.algorithms.rft import rft_config
from rlhf_jax.config_groups import loop_config, optimizer_config, sampling_config  # noqa: F401 (for configs/)
from rlhf_jax.sharding import DEFAULT_RULES
from rlhf_jax.stages.best_of_n import best_of_n_config
from rlhf_jax.stages.evaluate import eval_config
from rlhf_jax.stages.evaluation import evaluation_config
from rlhf_jax.stages.label import label_config
from rlhf_jax.stages.tokenizer import tokenizer_config

# The default chain; each is also the name of its instance.
DEFAULT_STAGES = ("tokenizer", "pretrain", "sft", "label", "reward", "ppo", "eval")

# Kind -> its default instance section.
KIND_CONFIGS = {"tokenizer": tokenizer_config, "pretrain": pretrain_config, "sft": sft_config,
                "label": label_config, "reward": reward_config, "ppo": ppo_config, "eval": eval_config,
                "rft": rft_config, "best_of_n": best_of_n_config, "dpo": dpo_config}

MODEL_PRESETS = {
    # Fast enough for tests and the 5-minute CPU quickstart.
    "tiny": dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=0, d_ff=256, max_len=128),
    # The bench-small size of DESIGN.md.
    "small": dict(num_layers=4, d_model=256, num_heads=4, num_kv_heads=0, d_ff=1024, max_len=512),
    # GPT-2 124M.
    "gpt2": dict(num_layers=12, d_model=768, num_heads=12, num_kv_heads=0, d_ff=3072, max_len=1024),
    # A small Llama-style model (GQA, SwiGLU, RoPE).
    "llama": dict(flavour="llama", num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8, d_ff=5632,
                  max_len=2048, param_dtype="bfloat16", dtype="bfloat16", remat=True, scan_layers=True),
}


def model_config(preset: str = "tiny", vocab_size: int = 1024) -> ConfigDict:
  """``config.model`` for a preset name (tiny, small, gpt2, llama)."""
  if preset not in MODEL_PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; known: {sorted(MODEL_PRESETS)}")
  model = dict(vocab_size=vocab_size, flavour="gpt2", dropout=0.0, param_dtype="float32", dtype="float32",
               matmul_dtype="", remat=False, scan_layers=False, attention_block=128, attention_impl="xla",
               rope_theta=10000.0, norm_eps=1e-5, num_kv_heads=0)
  model.update(MODEL_PRESETS[preset])
  return ConfigDict(model)


def stage(kind: str, **values) -> ConfigDict:
  """A stage instance section of ``kind`` with its defaults, ``values`` (inputs, settings) applied."""
  if kind not in KIND_CONFIGS:
    raise ValueError(f"unknown stage kind {kind!r}; known: {sorted(KIND_CONFIGS)}")
  section = KIND_CONFIGS[kind]()
  for key, value in values.items():
    if key not in section:
      raise ValueError(f"stage kind {kind!r} has no key {key!r}")
    section[key] = value
  return section


def base_config() -> ConfigDict:
  """The full default config: the whole InstructGPT pipeline on the built-in default task."""
  c = ConfigDict()
  c.seed = 0
  c.stages = ",".join(DEFAULT_STAGES)
  c.distributed = False  # multi-host: call jax.distributed.initialize() first
  # JAX's persistent compilation cache (compile_cache.py): "" turns it off; JAX_COMPILATION_CACHE_DIR wins.
  c.compilation_cache_dir = "~/.cache/rlhf_jax/xla"
  # Devices of JAX's CPU backend (cpu_devices.py): 0 one per core (at most 8), n: n. Read before JAX starts;
  # JAX_NUM_CPU_DEVICES, XLA_FLAGS' device count and RLHF_JAX_CPU_DEVICES win.
  c.cpu_devices = 0
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # decode: where samplers keep the weights while decoding (decode_layout.py): "tensor" (each process's
  # devices re-viewed tensor-parallel), "as_trained", or "auto" ("tensor" for a data-parallel CPU mesh whose
  # decode step is big enough to pay, else "as_trained").
  c.sharding = ConfigDict(dict(rules=DEFAULT_RULES, decode="auto"))
  c.model = model_config("tiny")

  # Where the data comes from: a built-in task (default) or user JSONL files.
  # -1: the task's own default.
  c.task = ConfigDict(dict(name="instruct", labeler_temperature=-1.0, demo_quality=-1.0, num_train_prompts=2048))
  c.data = ConfigDict(dict(
      pretraining_file="", demonstrations_file="", comparisons_file="", scored_file="", prompts_file="",
      prompt_len=24, response_len=24, seq_len=48,
      # Batches are cut to the narrowest bucket (min_bucket_len * 2**k tokens, or the full width) that holds
      # their real tokens; 0 pads every batch to the widths above (data/bucketing.py).
      min_bucket_len=16,
      # > 0: the pretrain, sft (and its ptx) and rft stages' training rows are packed: each step's sequences
      # laid end to end in rows of this many tokens, each attending within itself (data/packing.py).
      pack_width=0))
  c.evaluation = evaluation_config()
  for name in DEFAULT_STAGES:
    c[name] = stage(name)
  return c
