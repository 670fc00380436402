"""Every config key with its default, and model size presets.

Config files in ``configs/`` start from ``base_config()`` and change what
their experiment needs; because the result is locked, every key a run can
take is listed here, in one place.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from rlhf_jax.sharding import DEFAULT_RULES

ALL_STAGES = ("tokenizer", "pretrain", "sft", "label", "reward", "ppo", "eval")

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
               remat=False, scan_layers=False, rope_theta=10000.0, norm_eps=1e-5, num_kv_heads=0)
  model.update(MODEL_PRESETS[preset])
  return ConfigDict(model)


def optimizer_config(lr: float, warmup_steps: int = 0, schedule: str = "cosine", weight_decay: float = 0.0,
                     grad_clip: float = 1.0) -> ConfigDict:
  """AdamW settings of one stage (see ``rlhf_jax.state.make_optimizer``)."""
  return ConfigDict(dict(lr=lr, warmup_steps=warmup_steps, schedule=schedule, end_factor=0.1, b1=0.9, b2=0.95,
                         eps=1e-8, weight_decay=weight_decay, grad_clip=grad_clip))


def sampling_config(max_new_tokens: int = 24, temperature: float = 1.0) -> ConfigDict:
  """Sampler settings (see ``rlhf_jax.generate.SamplingConfig``)."""
  return ConfigDict(dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                         greedy=False, stop_at_eos=True))


def loop_config(steps: int, batch_size: int, lr: float, log_every: int = 50) -> ConfigDict:
  """The keys every trained stage has: steps, batch, optimizer, logging and checkpoint cadence."""
  return ConfigDict(dict(steps=steps, batch_size=batch_size, optimizer=optimizer_config(lr),
                         log_every=log_every, eval_every=0, checkpoint_every=max(steps // 4, 1),
                         keep_checkpoints=2, async_checkpoints=True))


def base_config() -> ConfigDict:
  """The full default config: the whole InstructGPT pipeline on the built-in default task."""
  c = ConfigDict()
  c.seed = 0
  c.stages = ",".join(ALL_STAGES)
  c.distributed = False  # multi-host: call jax.distributed.initialize() first
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = ConfigDict(dict(rules=DEFAULT_RULES))
  c.model = model_config("tiny")

  # Where the data comes from: a built-in task (default) or user JSONL files.
  # -1: the task's own default.
  c.task = ConfigDict(dict(name="instruct", labeler_temperature=-1.0, demo_quality=-1.0, num_train_prompts=2048))
  c.data = ConfigDict(dict(
      pretraining_file="", demonstrations_file="", comparisons_file="", scored_file="", prompts_file="",
      prompt_len=24, response_len=24, seq_len=48))
  c.tokenizer = ConfigDict(dict(path="", vocab_size=1024, model_type="unigram", byte_fallback=True))

  c.pretrain = loop_config(steps=400, batch_size=32, lr=3e-3)
  c.sft = loop_config(steps=600, batch_size=32, lr=3e-3)
  c.sft.update(dict(mask_prompt=True, ptx_coef=0.0, init_from="pretrain"))

  c.label = ConfigDict(dict(num_prompts=2048, k=8, batch_size=64, sampling=sampling_config()))
  c.reward = loop_config(steps=600, batch_size=16, lr=5e-4)
  c.reward.update(dict(loss="ranking", margin=0.0, init_from="sft", head_std=-1.0, normalize="gain_bias",
                       normalize_samples=256, eval_comparisons=128))

  c.ppo = ConfigDict(dict(
      iterations=80, prompts_per_iteration=32, samples_per_prompt=1, epochs=2, minibatches=2,
      sampling=sampling_config(),
      policy_optimizer=optimizer_config(3e-4, schedule="constant"),
      value_optimizer=optimizer_config(1e-3, schedule="constant"),
      value_init="reward",  # reward | sft | shared (a value head on the policy trunk)
      kl_estimator="k1", kl_coef=0.1, kl_adaptive=False, kl_target=6.0, kl_horizon=10000,
      gamma=1.0, lam=0.95, whiten_rewards=False, whiten_advantages=True,
      clip_eps=0.2, value_clip=0.2, value_coef=0.5, entropy_coef=0.0,
      ptx_coef=0.0, ptx_batch_size=16,
      no_eos_penalty=0.0, truncate_at_stop=False,
      log_every=5, eval_every=20, checkpoint_every=20, keep_checkpoints=2, async_checkpoints=True))

  c.eval = ConfigDict(dict(num_prompts=128, policy="ppo", reference="sft", sampling=sampling_config(),
                           lm_loss_batches=4, batch_size=64))
  return c
