"""The whole InstructGPT pipeline on the built-in default task, sized for ~5 minutes on 2 CPU cores.

  rlhf-jax --config=configs/quickstart.py --workdir=/tmp/quickstart
"""

from rlhf_jax import defaults


def get_config(arg=None):
  del arg
  return defaults.base_config()
