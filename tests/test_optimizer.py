"""The optimizer (``state.make_optimizer``): its schedule against optax's, its numbers in the optimizer state
(so runs differing only in them compile one program), and resuming a checkpoint from before that layout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import sharding, state as state_lib
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.stages.loop import CheckpointLayoutError, _restore_legacy_layout


def optax_schedule(lr, total, warmup, decay, end):
  """The schedule as optax's own pieces build it (what rlhf_jax used before the numbers moved to the state)."""
  steps = max(total - warmup, 1)
  after = {"constant": optax.constant_schedule(lr), "linear": optax.linear_schedule(lr, lr * end, steps),
           "cosine": optax.cosine_decay_schedule(lr, steps, alpha=end)}[decay]
  return after if warmup <= 0 else optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


@pytest.mark.parametrize("decay", state_lib.SCHEDULES)
@pytest.mark.parametrize("warmup", [0, 4])
def test_schedule_matches_optax(decay, warmup):
  ours = state_lib.learning_rate_schedule(3e-4, 20, warmup, decay, 0.1)
  ref = optax_schedule(3e-4, 20, warmup, decay, 0.1)
  got = np.array([float(ours(jnp.asarray(t))) for t in range(26)])
  want = np.array([float(ref(t)) for t in range(26)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
  assert got[-1] == pytest.approx(3e-4 * (1.0 if decay == "constant" else 0.1), rel=1e-6)


def test_unknown_schedule_is_named():
  with pytest.raises(ValueError, match="optimizer.schedule must be constant, linear or cosine, got 'step'"):
    state_lib.make_optimizer({"lr": 1e-3, "schedule": "step"}, 10)


def _setup(tx, seed=0):
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  params = {"w": jax.random.normal(jax.random.key(seed), (4, 3)), "b": jnp.zeros((3,))}
  rep = jax.tree.map(lambda _: sharding.replicated(mesh), params)
  return state_lib.create_train_state({"m": params}, {"m": tx}, {"m": rep}, mesh, seed=0)


def _step(tx):
  def step(state, x):
    grads = jax.grad(lambda p: jnp.sum((x @ p["w"] + p["b"]) ** 2))(state.params["m"])
    updates, opt = tx.update(grads, state.opt_state["m"], state.params["m"])
    return state.replace(step=state.step + 1, params={"m": optax.apply_updates(state.params["m"], updates)},
                         opt_state={"m": opt})
  return step


X = jnp.arange(8.0).reshape(2, 4) / 8


def test_runs_that_differ_only_in_numbers_compile_one_program():
  settings = [dict(lr=1e-3, warmup_steps=2, grad_clip=1.0, weight_decay=0.1),
              dict(lr=3e-2, warmup_steps=5, grad_clip=0.5, weight_decay=0.0, b1=0.8, end_factor=0.5,
                   schedule="linear")]
  texts, results = [], []
  for cfg, total in zip(settings, (10, 40)):
    tx = state_lib.make_optimizer(cfg, total)
    state, _ = _setup(tx)
    texts.append(jax.jit(_step(tx)).lower(state, X).as_text())
    for _ in range(3):
      state = jax.jit(_step(tx))(state, X)
    results.append(state.params["m"]["w"])
  assert texts[0] == texts[1]
  assert not np.allclose(results[0], results[1])  # the numbers still act
  # Only whether clipping is on shapes the program.
  other = state_lib.make_optimizer({**settings[0], "grad_clip": 0.0}, 10)
  assert jax.jit(_step(other)).lower(_setup(other)[0], X).as_text() != texts[0]


@pytest.mark.parametrize("decay", state_lib.SCHEDULES)
def test_learning_rate_reads_the_schedule_from_the_state(decay):
  tx = state_lib.make_optimizer(dict(lr=2e-3, warmup_steps=3, schedule=decay, end_factor=0.2), 10)
  ref = optax_schedule(2e-3, 10, 3, decay, 0.2)
  state, _ = _setup(tx)
  for t in range(12):
    assert float(state_lib.learning_rate(state.opt_state["m"])) == pytest.approx(float(ref(t)), rel=1e-5, abs=1e-12)
    state = jax.jit(_step(tx))(state, X)


def test_steps_equal_optax_adamw_with_the_same_settings():
  cfg = dict(lr=1e-2, warmup_steps=2, grad_clip=0.5, weight_decay=0.1, b1=0.8, b2=0.99, eps=1e-6)
  ours = state_lib.make_optimizer(cfg, 12)
  ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(
      optax_schedule(1e-2, 12, 2, "cosine", 0.1), b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1,
      mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)))
  states = [_setup(ours)[0], _setup(ref)[0]]
  for _ in range(6):
    states = [jax.jit(_step(tx))(s, X) for tx, s in zip((ours, ref), states)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *[s.params for s in states])


def test_a_checkpoint_from_before_the_numbers_moved_resumes(tmp_path):
  """A checkpoint of the bare optax chain (the layout of earlier rlhf_jax) restores into today's state and
  training continues as if it had never stopped."""
  cfg = dict(lr=1e-2, grad_clip=1.0, weight_decay=0.1)
  ours = state_lib.make_optimizer(cfg, 12)
  legacy = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax_schedule(1e-2, 12, 0, "cosine", 0.1), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
      mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)))
  old, _ = _setup(legacy)
  for _ in range(3):
    old = jax.jit(_step(legacy))(old, X)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=2, async_save=False)
  ckpt.save(3, old, {"compute": {}})
  ckpt.wait()
  fresh, shardings = _setup(ours)
  with pytest.raises(ValueError):
    ckpt.restore(state_lib.abstract_like(fresh, shardings), step=3)
  error = ValueError("tree structures do not match")
  resumed, extra = _restore_legacy_layout(ckpt, fresh, shardings, 3, error)
  assert extra == {"compute": {}} and int(resumed.opt_state["m"].count) == 3
  straight = fresh
  for _ in range(3):
    straight = jax.jit(_step(ours))(straight, X)
  for _ in range(3):
    resumed, straight = jax.jit(_step(ours))(resumed, X), jax.jit(_step(ours))(straight, X)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), resumed.params, straight.params)
  # A checkpoint of neither layout is refused, naming it, and left as it is.
  other, other_sh = _setup(state_lib.make_optimizer(dict(lr=1e-2), 12))
  with pytest.raises(CheckpointLayoutError, match=r"checkpoints step 3 does not match this stage's state"):
    _restore_legacy_layout(ckpt, other, other_sh, 3, error)
  assert ckpt.all_steps() == [3]
