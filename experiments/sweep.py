"""A hyperparameter sweep of a config's ``get_sweep(arg)`` with Optuna (see ``rlhf_jax.sweep``).

  python experiments/sweep.py --config=configs/sweep_kl.py[:ARG] --workdir=DIR [--parallel=N]
      [--storage=URL] [-- --config.a.b=value ...]

Arguments after ``--`` are passed to every run (e.g. shorter settings). Re-running the same
command resumes: finished trials are kept, interrupted ones continue in their own workdirs.
Writes DIR/sweep.csv and DIR/sweep.md.
"""

from __future__ import annotations

import subprocess
import sys

from absl import app, flags

from rlhf_jax.sweep import Sweep, worker_env

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file with get_sweep(arg): path.py[:arg].")
flags.DEFINE_string("workdir", None, "Sweep directory (study, shared upstream workdir, trials).")
flags.DEFINE_integer("parallel", 1, "Worker processes; each takes whole devices.")
flags.DEFINE_string("storage", None, "Optuna storage URL (default: SQLite in the workdir).")
flags.DEFINE_integer("worker", -1, "Internal: run as worker number N.")


def main(argv):
  if not FLAGS.config or not FLAGS.workdir:
    raise app.UsageError("--config and --workdir are required")
  extra = argv[1:]
  sweep = Sweep(FLAGS.config, FLAGS.workdir, FLAGS.storage, extra)
  if FLAGS.worker >= 0:
    sweep.work(worker_env(FLAGS.worker, FLAGS.parallel))
    return 0
  sweep.recover()
  print(f"[sweep] {sweep.n_trials()} trials, {sweep.remaining()} to go; shared upstream: {sweep.upstream}", flush=True)
  cmd = [sys.executable, __file__, f"--config={FLAGS.config}", f"--workdir={FLAGS.workdir}",
         f"--parallel={FLAGS.parallel}"] + ([f"--storage={FLAGS.storage}"] if FLAGS.storage else [])
  workers = [subprocess.Popen(cmd + [f"--worker={i}", "--", *extra]) for i in range(FLAGS.parallel)]
  codes = [w.wait() for w in workers]
  sweep.write_results()
  print(open(f"{FLAGS.workdir}/sweep.md").read(), flush=True)
  if any(codes) or sweep.remaining():
    print(f"[sweep] {sweep.remaining()} trials not finished (worker exit codes {codes}); re-run the same "
          "command to retry them.", *sweep.failures(), sep="\n", file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
