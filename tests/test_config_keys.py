"""Every config key acts: a tiny run of the whole default chain reads every key of the defaults.

Reads are recorded at ``ConfigDict.__getitem__`` (attribute access goes
through it); keys that only a setting switches on are listed in
``READ_ONLY_WHEN`` with that setting, and that list must be exact.
"""

import json

import ml_collections
import pytest

from rlhf_jax import defaults, pipeline

# Keys a run reads only under another setting (key -> when); tiny_config switches on the others
# (ptx in sft and ppo, adaptive KL, dropout) and runs every stage kind on bf16 weight products.
READ_ONLY_WHEN = {"data.scored_file": "reward.loss = direct_sigmoid or direct_mse (scored data)",
                  "rft.top_fraction": "rft.selection = top_fraction",
                  "rft.kl_beta": "rft.selection = kl_aware",
                  "dpo.samples_per_prompt": "dpo.online = True",
                  "dpo_pre.samples_per_prompt": "dpo_pre.online = True",
                  "dpo_packed.samples_per_prompt": "dpo_packed.online = True",
                  "grpo.value_init": "grpo.advantage = gae (a value model)"}


def _leaves(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def _paths(config, prefix=""):
  out = {id(config): prefix}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_paths(value, f"{prefix}{key}."))
  return out


def tiny_config():
  c = defaults.base_config()
  c.pretrain.update(dict(steps=4, batch_size=8, log_every=2))
  c.sft.update(dict(steps=4, batch_size=8, log_every=2, ptx_coef=0.1))
  c.label.update(dict(num_prompts=8, k=2))
  # Packed comparisons (each prompt once, then its K=2 responses) under dropout and bf16 weight products.
  c.reward.update(dict(steps=4, batch_size=4, log_every=2, normalize_samples=8, pack_width=96))
  c.evaluation.update(dict(num_prompts=8, lm_loss_batches=1))
  c.ppo.update(dict(iterations=2, prompts_per_iteration=4, log_every=1, eval_every=1, checkpoint_every=1,
                    ptx_coef=0.1, ptx_batch_size=4, kl_adaptive=True))
  c.model.dropout = 0.1
  c.data.pack_width = 96  # pretrain and sft (with its ptx rows) on packed rows, under dropout and bf16
  c.model.matmul_dtype = "bfloat16"  # every stage kind through the bf16 weight products (mixed_matmul)
  c.model.attention_block = 32  # rows of 64 tokens and more attend in causal query blocks
  # The kinds outside the default chain, with the settings that switch their other keys on.
  c.rft = defaults.stage("rft", selection="threshold", rounds=2, prompts_per_round=4, samples_per_prompt=2,
                         improve_passes=2, improve_steps=1, batch_size=4, log_every=1, checkpoint_every=2)
  c.bon = defaults.stage("best_of_n", ns=(1, 2), num_prompts=4)
  c.dpo = defaults.stage("dpo", steps=2, batch_size=4, log_every=1, eval_every=1, checkpoint_every=1,
                         reward="reward", label_smoothing=0.1)
  # The same offline DPO with the reference's log-probs computed before the first step.
  c.dpo_pre = defaults.stage("dpo", steps=2, batch_size=4, log_every=1, eval_every=0, checkpoint_every=1,
                             reward="reward", label_smoothing=0.1, precompute_reference=True)
  # The same on packed comparisons (each prompt once, then its responses), with the precomputed table.
  c.dpo_packed = defaults.stage("dpo", steps=2, batch_size=4, log_every=1, eval_every=0, checkpoint_every=1,
                                reward="reward", label_smoothing=0.1, precompute_reference=True, pack_width=96)
  c.dpo_online = defaults.stage("dpo", online=True, comparisons=(), reward="reward", loss="ipo",
                                average_log_probs=True, steps=2, batch_size=2, log_every=1, checkpoint_every=2)
  # The critic-free estimators on the ppo path (GRPO: group advantages, k3 KL in the loss, dropped groups),
  # in one minibatch: the update finishes the experience (fuse_experience) and reports its rollout/* metrics.
  c.grpo = defaults.stage("ppo", advantage="grpo", samples_per_prompt=2, drop_zero_variance_groups=True,
                          iterations=2, prompts_per_iteration=2, minibatches=1, log_every=1, checkpoint_every=2,
                          kl_adaptive=True, ptx_coef=0.1, ptx_batch_size=2)
  c.stages += ",rft,bon,dpo,dpo_pre,dpo_packed,dpo_online,grpo"
  return c


def test_every_default_key_is_read_by_a_run(tmp_path, monkeypatch):
  config = tiny_config()
  paths = _paths(config)
  read = set()
  quiet = [0]  # > 0 while the whole config is serialised (config.json), which is not a use
  cd = ml_collections.ConfigDict
  originals = {name: getattr(cd, name) for name in ("__getitem__", "to_dict", "items")}

  def recording_getitem(self, key):
    if not quiet[0] and id(self) in paths:
      read.add(paths[id(self)] + key)
    return originals["__getitem__"](self, key)

  def whole_group(name):
    # A group handed over whole (e.g. config.model to DecoderConfig, config.mesh to make_mesh) is read;
    # the root serialised to config.json or walked for its instances is not.
    def wrapper(self, *args, **kwargs):
      quiet[0] += 1
      try:
        if quiet[0] == 1 and id(self) in paths and self is not config:
          read.update(paths[id(self)] + k for k in _leaves(self))
        return originals[name](self, *args, **kwargs)
      finally:
        quiet[0] -= 1
    return wrapper

  monkeypatch.setattr(cd, "__getitem__", recording_getitem)
  monkeypatch.setattr(cd, "to_dict", whole_group("to_dict"))
  monkeypatch.setattr(cd, "items", whole_group("items"))
  pipeline.run(config, str(tmp_path))
  monkeypatch.undo()
  unread = {k for k in _leaves(config) if k not in read}
  assert unread == set(READ_ONLY_WHEN), sorted(unread)
  # Compute counters of the sampling and training stages, against what their settings imply.
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["sft"]["compute/grad_steps"] == 4 and summary["sft"]["compute/flops"] > 0
  assert summary["rft"]["compute/grad_steps"] <= 4 and summary["rft"]["compute/samples"] == 2 * 4 * 2
  assert 0 < summary["rft"]["compute/tokens_generated"] <= 16 * c_sampled(config.rft)
  assert summary["bon"]["compute/samples"] == 4 * 2
  assert summary["label"]["compute/samples"] == 8 * 2 and summary["label"]["compute/grad_steps"] == 0
  assert summary["reward"]["compute/grad_steps"] == 4 and summary["reward"]["compute/samples"] == 8
  ppo = config.ppo
  assert summary["ppo"]["compute/samples"] == ppo.iterations * ppo.prompts_per_iteration
  assert summary["ppo"]["compute/grad_steps"] == ppo.iterations * ppo.epochs * ppo.minibatches
  assert {"bon/2/gold_reward", "bon/2/kl_formula", "bon/2/kl_estimate"} <= set(summary["bon"])
  assert summary["dpo"]["compute/grad_steps"] == 2 and "eval/preference_accuracy" in summary["dpo"]
  # Precomputed reference log-probs: the same steps, one reference pass over the data instead of one a step.
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  names = ("dpo", "dpo_pre", "dpo_packed")
  train = {name: [r for r in rows if r["stage"] == name and "train/loss" in r] for name in names}
  assert [r["step"] for r in train["dpo"]] == [r["step"] for r in train["dpo_pre"]] == [1, 2]
  assert [r["step"] for r in train["dpo_packed"]] == [1, 2]
  for a, b, c in zip(train["dpo"], train["dpo_pre"], train["dpo_packed"]):
    # At step 1 policy == reference: every log-ratio is 0 in-step (a tie, half right) but a rounding error
    # away from 0 against a table computed in other batches, so only the accuracy may differ there.
    for k in (k for k in a if k.startswith("train/") and (a["step"] > 1 or k != "train/accuracy")):
      # Adam's first update is lr * sign(g), so a gradient element near 0 moves by 2 lr either way: after
      # step 1, other float rounding (bf16 products) makes step 2's log-ratios differ by ~0.2-0.4%.
      assert b[k] == pytest.approx(a[k], rel=1e-4 if a["step"] == 1 else 6e-3, abs=1e-5 if a["step"] == 1 else 1e-4), (
          a["step"], k)
      # Other rows too (packed): other rounding from step 1 on.
      assert c[k] == pytest.approx(a[k], rel=1e-3 if a["step"] == 1 else 6e-3, abs=1e-4), (a["step"], k, "packed")
    assert 0.0 < c["data/fill"] <= 1.0  # packed slots: here one ~70-token example per 96-token row
  assert summary["dpo_pre"]["compute/grad_steps"] == 2
  # 2 steps x 4 prompts are one epoch of the label stage's 8 comparisons: either way each one's reference
  # pass is counted exactly once.
  assert summary["dpo_pre"]["compute/flops"] == pytest.approx(summary["dpo"]["compute/flops"], rel=1e-6)
  assert summary["dpo_online"]["compute/samples"] == 2 * 2 * 2 and summary["dpo_online"]["compute/grad_steps"] == 2
  assert summary["grpo"]["compute/samples"] == 2 * 2 * 2
  grpo_rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  grpo_rows = [r for r in grpo_rows if r["stage"] == "grpo" and "train/kl_loss" in r]
  assert len(grpo_rows) == 2 and all("train/value_loss" not in r for r in grpo_rows)
  assert all(0.0 <= r["rollout/zero_variance_fraction"] <= 1.0 for r in grpo_rows)
  ppo_rows = [r for r in rows if r["stage"] == "ppo" and "train/policy_loss" in r]
  rollout_keys = {k for k in ppo_rows[0] if k.startswith("rollout/")} - {"rollout/value", "rollout/return"}
  assert len(rollout_keys) > 10 and all(rollout_keys <= set(r) for r in grpo_rows)
  # The adaptive controller moved the coefficient with the KL the update reported.
  assert 0 < grpo_rows[1]["train/kl_coef"] != grpo_rows[0]["train/kl_coef"]


def c_sampled(section):
  return section.sampling.max_new_tokens
