"""Experiments as stage graphs: stage instances with a name, a kind and named inputs.

A config section with a ``kind`` key is a stage instance; its name is the
section's name, which is also its directory in the workdir, its key in
``summary.json`` and the ``stage`` of its metrics rows. Its inputs are config
keys of the section that name other instances (``ppo_2.reward = "reward_2"``),
so an iterated-RLHF round or a second PPO arm is a few more sections, and
``config.stages`` lists which instances run, in order.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from etils import epath
from ml_collections import ConfigDict

from rlhf_jax.config_io import ConfigError
from rlhf_jax.models.hf import HF_PREFIX

# What an instance of each kind produces for later instances.
POLICY, REWARD, COMPARISONS = "policy", "reward", "comparisons"
# A policy or reward input may instead name a Hugging Face checkpoint directory: "hf:PATH" (a causal LM, or a
# one-label sequence-classification model as a reward model). Such inputs are not instances to run first.
EXTERNAL = (POLICY, REWARD)


@dataclasses.dataclass(frozen=True)
class StageKind:
  """A kind of stage: its runner, what it produces, and which config keys are inputs (key -> what they name).

  Inputs listed in ``optional`` may be empty ("" or ()); inputs whose value is a tuple name several instances.
  """

  name: str
  produces: str | None
  inputs: dict[str, str]
  optional: tuple[str, ...] = ()
  accepts: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

  def runner(self) -> Callable:
    """The kind's ``run(ctx, instance) -> final metrics`` (imported on first use)."""
    import importlib
    module = "evaluate" if self.name == "eval" else self.name
    return importlib.import_module(f"rlhf_jax.stages.{module}").run


KINDS = {k.name: k for k in (
    StageKind("tokenizer", None, {}),
    StageKind("pretrain", POLICY, {"init_from": POLICY}, optional=("init_from",)),
    StageKind("sft", POLICY, {"init_from": POLICY}, optional=("init_from",)),
    StageKind("label", COMPARISONS, {"policy": POLICY, "reward": REWARD}, optional=("reward",)),
    # A reward instance starts from a policy's trunk or continues another reward model.
    StageKind("reward", REWARD, {"init_from": POLICY, "comparisons": COMPARISONS, "reference": POLICY},
              optional=("init_from",), accepts={"init_from": (POLICY, REWARD)}),
    StageKind("ppo", POLICY, {"policy": POLICY, "reference": POLICY, "reward": REWARD}),
    StageKind("rft", POLICY, {"policy": POLICY, "reference": POLICY, "reward": REWARD}),
    StageKind("best_of_n", None, {"policy": POLICY, "reward": REWARD}),
    # reference "" = the policy input; reward: the online ranker (ranker="rm") and eval/rm_reward.
    StageKind("dpo", POLICY, {"policy": POLICY, "reference": POLICY, "comparisons": COMPARISONS, "reward": REWARD},
              optional=("reference", "comparisons", "reward")),
    StageKind("eval", None, {"policies": POLICY, "reference": POLICY, "baseline": POLICY, "reward": REWARD},
              optional=("policies", "reference", "baseline", "reward")),
)}


@dataclasses.dataclass(frozen=True)
class Instance:
  """One stage instance: ``name`` (section and directory), its ``kind``, its config section, and its inputs."""

  name: str
  kind: StageKind
  section: ConfigDict

  def input_names(self, key: str) -> tuple[str, ...]:
    """The instance names an input key holds (empty when unset)."""
    value = self.section[key]
    if isinstance(value, str):
      return (value,) if value else ()
    return tuple(v for v in value if v)

  def dependencies(self) -> dict[str, tuple[str, ...]]:
    """Input key -> instance names, for every input that names instances ("hf:PATH" inputs are not)."""
    found = {key: tuple(n for n in self.input_names(key) if not n.startswith(HF_PREFIX)) for key in self.kind.inputs}
    return {key: names for key, names in found.items() if names}


def instances(config: ConfigDict) -> dict[str, Instance]:
  """Every stage instance the config defines (sections with a ``kind``), by name."""
  found = {}
  for name, section in config.items():
    if isinstance(section, ConfigDict) and "kind" in section:
      if section.kind not in KINDS:
        raise ConfigError(f"config.{name}.kind is {section.kind!r}; known kinds: {sorted(KINDS)}")
      found[name] = Instance(name, KINDS[section.kind], section)
  return found


def check_inputs(config: ConfigDict) -> dict[str, Instance]:
  """Validates every instance's inputs (they name instances of the right kind); returns ``instances``."""
  known = instances(config)
  for inst in known.values():
    for key, what in inst.kind.inputs.items():
      names = inst.input_names(key)
      if not names and key not in inst.kind.optional:
        raise ConfigError(f"config.{inst.name}.{key} is empty; it must name a {what} instance")
      for name in names:
        allowed = inst.kind.accepts.get(key, (what,))
        if name.startswith(HF_PREFIX) and set(allowed) & set(EXTERNAL):
          continue
        if name not in known or known[name].kind.produces not in allowed:
          options = sorted(n for n, i in known.items() if i.kind.produces in allowed)
          raise ConfigError(f"config.{inst.name}.{key} = {name!r} names no {' or '.join(allowed)} instance; "
                            f"known: {options}")
  return known


def parse_stages(config: ConfigDict) -> list[Instance]:
  """The instances ``config.stages`` lists, in order; unknown names raise ``ConfigError``."""
  known = check_inputs(config)
  names = [s.strip() for s in config.stages.split(",") if s.strip()]
  unknown = [s for s in names if s not in known]
  if unknown:
    raise ConfigError(f"config.stages names unknown stage(s) {unknown}; known: {list(known)}")
  if not names:
    raise ConfigError("config.stages is empty")
  if len(set(names)) != len(names):
    raise ConfigError(f"config.stages lists an instance twice: {names}")
  return [known[n] for n in names]


def finished(workdir: str, name: str) -> bool:
  """Whether instance ``name`` has finished in ``workdir`` (its DONE.json exists)."""
  return epath.Path(workdir, name, "DONE.json").exists()


def check_order(chain: list[Instance], workdir: str) -> None:
  """Every input of a listed instance runs before it in ``chain`` or has finished already."""
  earlier: set[str] = set()
  for inst in chain:
    for key, names in inst.dependencies().items():
      for name in names:
        if name not in earlier and not finished(workdir, name):
          raise ConfigError(f"stage '{inst.name}' needs '{name}' (config.{inst.name}.{key}), which has not run "
                            f"in {workdir}: list '{name}' before '{inst.name}' in config.stages")
    earlier.add(inst.name)
