"""Loading config files (``path.py[:arg]``), applying ``--config.a.b=value`` overrides, recording.

Configs are locked ``ml_collections.ConfigDict``s: an override of a key that
does not exist fails with a message naming the key and the closest known
ones, so a typo never silently runs the default. The command line parses its
overrides with ``ml_collections.config_flags`` (see ``main.py``) and uses
``check_override_key`` here for the error message; ``apply_overrides`` does
the same for code that holds ``(key, text)`` pairs.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from typing import Any, Iterable

import ml_collections

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A config file or override that cannot be used."""


def load_config(spec: str) -> ConfigDict:
  """Loads ``path.py`` or ``path.py:arg`` by calling its ``get_config(arg)``; returns it locked."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  module_spec = importlib.util.spec_from_file_location(f"_rlhf_jax_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(arg) function")
  config = module.get_config(arg or None)
  if not isinstance(config, ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
  config.lock()
  return config


def _all_keys(config: ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ConfigDict):
      keys.extend(_all_keys(v, prefix + k + "."))
  return keys


def flat_items(config: ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
  """``(dotted key, value)`` of every leaf (non-group) key, in the config's order."""
  items = []
  for k, v in config.items():
    if isinstance(v, ConfigDict):
      items.extend(flat_items(v, prefix + k + "."))
    else:
      items.append((prefix + k, v))
  return items


def check_override_key(config: ConfigDict, key: str) -> None:
  """Raises ``ConfigError`` unless ``key`` (dotted) names a leaf of ``config``; names close matches."""
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, ConfigDict) or part not in node:
      close = difflib.get_close_matches(key, _all_keys(config), n=3)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}' in --config.{key}{hint}")
    node = node[part]
  if isinstance(node, ConfigDict):
    raise ConfigError(f"--config.{key} names a group; set one of its keys instead")


def tuple_override(value: tuple, key: str) -> tuple:
  """A tuple override as typed on a command line -> its items.

  ``ml_collections`` reads ``--config.k=a,b`` and ``--config.k=(a,b)`` (unquoted names, which are not Python
  literals) as the one string ``'a,b'`` / ``'(a,b)'``. Such a lone string is split at its commas (outer
  brackets dropped) and each item read as a literal where it is one (``1``, ``'x'``), else kept as a name.
  Nested tuples must be typed as a quoted Python literal; anything else is returned unchanged.
  """
  if len(value) != 1 or not isinstance(value[0], str):
    return value
  text = value[0].strip()
  if text[:1] in "([" and text[-1:] in ")]":
    text = text[1:-1]
  elif "," not in text:
    return value
  if any(c in text for c in "()[]{}"):
    raise ConfigError(f"--config.{key}={value[0]}: a nested tuple must be a quoted Python literal, e.g. "
                      f"--config.{key}=\"(('a', 1), ('b', 2))\"")

  def item(s: str) -> Any:
    try:
      return ast.literal_eval(s)
    except (ValueError, SyntaxError):
      return s

  return tuple(item(s.strip()) for s in text.split(",") if s.strip())


def _parse_value(text: str, current: Any, key: str) -> Any:
  """Parses ``text`` as the type of the value it replaces."""
  try:
    if isinstance(current, bool):
      lowered = text.lower()
      if lowered not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return lowered in ("true", "1")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, (tuple, list)):
      items = [s.strip() for s in text.split(",") if s.strip()]
      if current and not isinstance(current[0], str):
        items = [type(current[0])(s) for s in items]
      return type(current)(items)
    if current is None:
      return json.loads(text) if text[:1] in "[{0123456789-" else text
  except ValueError as e:
    raise ConfigError(f"--config.{key}={text}: expected a {type(current).__name__}") from e
  return text


def _parent(config: ConfigDict, key: str) -> tuple[ConfigDict, str]:
  """(the group holding a dotted ``key``, the key's last part)."""
  *groups, leaf = key.split(".")
  node = config
  for part in groups:
    node = node[part]
  return node, leaf


def apply_overrides(config: ConfigDict, overrides: Iterable[tuple[str, str]]) -> ConfigDict:
  """Applies ``(dotted_key, text)`` overrides in place; unknown keys raise ``ConfigError``."""
  for key, text in overrides:
    check_override_key(config, key)
    node, leaf = _parent(config, key)
    node[leaf] = _parse_value(text, node[leaf], key)
  return config


def fix_tuple_overrides(config: ConfigDict, overrides: dict[str, Any]) -> None:
  """Re-reads, in place, the tuple values among ml_collections' parsed ``--config.KEY`` overrides
  (``tuple_override``)."""
  for key, value in overrides.items():
    if isinstance(value, tuple):
      node, leaf = _parent(config, key)
      node[leaf] = tuple_override(value, key)


def config_to_json(config: ConfigDict) -> str:
  """The resolved config as stable, indented JSON (what a run records in ``config.json``)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def config_from_json(text: str) -> ConfigDict:
  """The locked ``ConfigDict`` of a recorded ``config.json`` (lists stay lists; readers convert)."""
  try:
    values = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(f"not a config.json written by rlhf-jax ({e})") from e
  if not isinstance(values, dict):
    raise ConfigError("not a config.json written by rlhf-jax (not a JSON object)")
  config = ConfigDict(values)
  config.lock()
  return config


def read_workdir_config(workdir: str) -> ConfigDict:
  """The resolved config a run recorded in ``WORKDIR/config.json``."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"no config.json in {workdir}: not a workdir of an rlhf-jax run")
  with open(path) as f:
    try:
      return config_from_json(f.read())
    except ConfigError as e:
      raise ConfigError(f"{path}: {e}") from e
