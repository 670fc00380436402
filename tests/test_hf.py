"""Hugging Face checkpoints in and out: tiny random GPT-2, Llama and Qwen2 models built with ``transformers``.

Logits of the imported decoder match ``transformers``' on the same tokens (float32, max abs diff < 1e-4),
including a left-padded batch; the export loads back into ``transformers`` (policies and reward models);
errors name the unsupported architecture or the missing/mis-shaped tensor; a stage starts from an
"hf:PATH" checkpoint with its tokenizer.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

# torch, transformers and tokenizers are in the test extra: a missing one must fail the suite, not skip it.
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import sentencepiece as spm  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from fake_devices import cpu_env  # noqa: E402
from rlhf_jax import main as cli, pipeline  # noqa: E402
from rlhf_jax.config_io import load_config  # noqa: E402
from rlhf_jax.data import hf_tokenizer  # noqa: E402
from rlhf_jax.models import Decoder, DecoderConfig, ScalarModel, hf, hf_export, layers  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Write a short poem about the sea.",
          "Question: what is 12 + 30? Answer: 42.", "Summarize: the cat sat on the mat, then slept.",
          "hello world, hello again; numbers 0123456789 and symbols !?%"] * 20


def _perturb(model, scale=0.1):
  """Random weights all over (HF init leaves norms at 1 and biases at 0, which would hide mapping bugs)."""
  torch.manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model.eval()


def _gpt2_tokenizer(path):
  """GPT-2's format: byte-level BPE as vocab.json + merges.txt, <|endoftext|> as BOS/EOS (id 0)."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                           show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  tok.model.save(str(path))
  return tok.get_vocab_size()


def _llama_tokenizer(path):
  """Llama's format: a sentencepiece tokenizer.model with unk 0, bos 1, eos 2 and no pad token."""
  spm.SentencePieceTrainer.Train(sentence_iterator=iter(CORPUS), model_prefix=str(path / "tokenizer"),
                                 vocab_size=120, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                 model_type="bpe", byte_fallback=False, character_coverage=1.0, num_threads=1,
                                 minloglevel=2)
  return spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model")).get_piece_size()


def _build(kind, path):
  path.mkdir()
  if kind == "qwen2":
    # Qwen2: Llama plus q/k/v biases (made nonzero by _perturb), byte-level BPE, tied embeddings, GQA.
    vocab = _gpt2_tokenizer(path) + 4
    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                      bos_token_id=0, eos_token_id=0)
    model = transformers.Qwen2ForCausalLM(config)
  elif kind == "gpt2":
    vocab = _gpt2_tokenizer(path) + 4  # a model vocabulary padded past the tokenizer's, as real ones often are
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
  else:
    vocab = _llama_tokenizer(path)
    tied = kind == "llama_tied"
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1 if tied else 2,
                                      max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5,
                                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
  _perturb(model).save_pretrained(str(path))
  return model


KINDS = ("gpt2", "llama", "llama_tied", "qwen2")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """kind -> (directory, transformers model)."""
  root = tmp_path_factory.mktemp("hf")
  return {kind: (str(root / kind), _build(kind, root / kind)) for kind in KINDS}


def _batch(vocab, seed=0):
  """Tokens [3, 12] with a mask: row 0 full, rows 1 and 2 left-padded by 3 and 7."""
  ids = np.random.RandomState(seed).randint(3, vocab, (3, 12))
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  mask[2, :7] = 0
  return ids, mask


def _hf_logits(model, ids, mask=None, positions=True):
  kwargs = {}
  if mask is not None:
    kwargs["attention_mask"] = torch.tensor(mask)
    if positions:  # what HF generate() passes for a padded batch, and what our decoder computes from the mask
      kwargs["position_ids"] = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), **kwargs).logits.numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(checkpoints, kind):
  path, ref = checkpoints[kind]
  model = hf.load(path)
  cfg = model.cfg
  assert cfg.flavour == ("gpt2" if kind == "gpt2" else "llama")
  assert cfg.tie_embeddings == (kind != "llama")
  assert cfg.qkv_bias == (kind == "qwen2")
  if kind != "gpt2":
    assert cfg.rope_theta == (1e6 if kind == "qwen2" else 500.0)
    assert cfg.kv_heads == (1 if kind == "llama_tied" else 2)
  ids, mask = _batch(cfg.vocab_size)
  # Unpadded: transformers' own positions.
  full = np.asarray(hf.forward(model, ids))
  assert full.shape == (3, 12, cfg.vocab_size)
  assert np.abs(full - _hf_logits(ref, ids)).max() < TOL
  # Left-padded: compared on the real tokens (pad positions' outputs are meaningless in both).
  ours = np.asarray(hf.forward(model, ids, mask))
  theirs = _hf_logits(ref, ids, mask)
  real = mask.astype(bool)
  assert np.abs(ours - theirs)[real].max() < TOL
  # ...and a left-padded row's logits are those of the same tokens unpadded.
  alone = np.asarray(hf.forward(model, ids[2:, 7:]))
  assert np.abs(ours[2, 7:] - alone[0]).max() < TOL


def test_scan_layers_and_sharded_checkpoint_load_the_same(checkpoints, tmp_path):
  path, _ = checkpoints["llama"]
  model = hf.load(path)
  ids, mask = _batch(model.cfg.vocab_size, seed=1)
  expected = np.asarray(hf.forward(model, ids, mask))
  # Many small shards + model.safetensors.index.json, read back into a scan_layers (stacked) decoder.
  params = nnx.split(model)[1].to_pure_dict()
  files = hf_export.save(str(tmp_path / "sharded"), model.cfg, params, max_shard_bytes=4096)
  assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 3
  scanned = hf.load(str(tmp_path / "sharded"), scan_layers=True)
  assert scanned.cfg.scan_layers
  np.testing.assert_allclose(np.asarray(hf.forward(scanned, ids, mask)), expected, atol=1e-5)


def test_loads_into_shards_of_a_mesh(checkpoints):
  """On a 2x2 (fsdp x tensor) mesh each device holds only its shard, and the logits are unchanged."""
  path, ref = checkpoints["gpt2"]
  ids, mask = _batch(hf.load(path).cfg.vocab_size)
  code = f"""
import json, numpy as np
from rlhf_jax import sharding
from rlhf_jax.models import hf
mesh = sharding.make_mesh({{"data": 1, "fsdp": 2, "tensor": 2}})
model = hf.load({path!r}, mesh=mesh)
wq = model.trunk.blocks[0].attn.wq[...]
w_in = model.trunk.blocks[0].mlp.w_in[...]
logits = hf.forward(model, np.array({ids.tolist()}), np.array({mask.tolist()}))
print(json.dumps({{"wq": [list(wq.shape), list(wq.addressable_shards[0].data.shape), len(wq.sharding.device_set)],
                  "w_in": [list(w_in.shape), list(w_in.addressable_shards[0].data.shape)],
                  "logits": np.asarray(logits).tolist()}}))
"""
  env = cpu_env(4)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["wq"] == [[32, 4, 8], [16, 2, 8], 4]  # embed over fsdp, heads over tensor
  assert out["w_in"] == [[32, 128], [16, 64]]
  real = mask.astype(bool)
  assert np.abs(np.asarray(out["logits"]) - _hf_logits(ref, ids, mask))[real].max() < TOL


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}])
def test_rope_scaling(rope, tmp_path):
  """Linear and Llama 3.1 RoPE scaling, on positions past the original context, and written back the same."""
  config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    rope_parameters={"rope_theta": 500.0, **rope})
  ref = _perturb(transformers.LlamaForCausalLM(config))
  ref.save_pretrained(str(tmp_path / "src"))
  model = hf.load(str(tmp_path / "src"))
  assert model.cfg.rope_scaling[:2] == (rope["rope_type"], rope["factor"])
  ids = np.random.RandomState(4).randint(0, 64, (2, 40))
  assert np.abs(np.asarray(hf.forward(model, ids)) - _hf_logits(ref, ids)).max() < TOL
  hf_export.save(str(tmp_path / "out"), model.cfg, nnx.split(model)[1].to_pure_dict())
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  assert np.abs(_hf_logits(back, ids) - _hf_logits(ref, ids)).max() < TOL


YARN = [{"factor": 4.0, "original_max_position_embeddings": 16},
        {"factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2,
         "attention_factor": 0.9, "truncate": False},
        {"factor": 2.5, "original_max_position_embeddings": 16, "mscale": 0.8, "mscale_all_dim": 0.5},
        {"factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 24.0, "truncate": True},
        {"factor": None, "original_max_position_embeddings": 16, "beta_slow": 0}]  # null factor: 64 / 16; 0: default


@pytest.mark.parametrize("rope", YARN)
@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_yarn_frequencies_match_transformers(rope, theta):
  """Our YaRN inverse frequencies and attention factor are transformers' for the same config.json."""
  hf_cfg = {"model_type": "llama", "vocab_size": 64, "hidden_size": 256, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 64,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": theta, **rope}}
  cfg = hf.decoder_config(hf_cfg)
  inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](transformers.LlamaConfig.from_dict(
      json.loads(json.dumps(hf_cfg))))
  assert cfg.rope_scaling[0] == "yarn" and cfg.rope_scaling[5] == pytest.approx(attention_factor, rel=1e-12)
  assert cfg.rope_scaling[6] == rope.get("truncate", True)
  ours = np.asarray(layers.rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
  np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)
  # The blend really happens: some dims are kept, some divided by the factor, some in between.
  ratio = ours / np.asarray(layers.rope_frequencies(cfg.head_dim, cfg.rope_theta))
  factor = cfg.rope_scaling[1]
  assert np.isclose(ratio, 1).any() and np.isclose(ratio, 1 / factor).any()
  assert ((ratio < 0.999) & (ratio > 1.001 / factor)).any()


def test_yarn_config_json_keys():
  """Legacy rope_scaling {"type": "yarn"} and a top-level original_max_position_embeddings (it wins, as in
  transformers); what our RoPE cannot represent is refused by key."""
  base = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 64, "rope_theta": 1e6}
  legacy = {**base, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}
  assert hf.decoder_config(legacy).rope_scaling == ("yarn", 4.0, 16, 32.0, 1.0, 0.1 * np.log(4.0) + 1, True)
  assert hf.decoder_config({**legacy, "original_max_position_embeddings": 8}).rope_scaling[2] == 8
  scaling = legacy["rope_scaling"]
  with pytest.raises(hf.HFError, match=r"config.json RoPE yarn with partial_rotary_factor=0.5 is not supported"):
    hf.decoder_config({**legacy, "rope_scaling": {**scaling, "partial_rotary_factor": 0.5}})
  with pytest.raises(hf.HFError, match=r"config.json RoPE yarn beta_fast=-1 is not supported"):
    hf.decoder_config({**legacy, "rope_scaling": {**scaling, "beta_fast": -1}})
  with pytest.raises(hf.HFError, match=r"config.json RoPE yarn original_max_position_embeddings=16.5 is not a whole"):
    hf.decoder_config({**legacy, "rope_scaling": {**scaling, "original_max_position_embeddings": 16.5}})
  with pytest.raises(hf.HFError, match=r"qwen2 config.json has no 'factor'"):
    hf.decoder_config({**legacy, "rope_scaling": {"type": "yarn"}})


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_yarn_logits_and_export(kind, tmp_path):
  """YaRN past original_max_position_embeddings (16; 40 tokens, a left-padded row), from transformers 5's
  rope_parameters (Llama) and the legacy rope_scaling key (Qwen2); the export keeps it, exactly."""
  shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
  src = str(tmp_path / "src")
  if kind == "llama":
    rope = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 8.0, "beta_slow": 0.25, "truncate": False}  # dim 1 blended part way
    config = transformers.LlamaConfig(**shape, rope_parameters=rope)
    _perturb(transformers.LlamaForCausalLM(config)).save_pretrained(src)
  else:
    _perturb(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape))).save_pretrained(src)
    config = hf.read_config(src)
    del config["rope_parameters"]
    config.update(rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                                "attention_factor": 1.3})
    pathlib.Path(src, "config.json").write_text(json.dumps(config))
  ref = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
  assert ref.model.rotary_emb.rope_type == "yarn"
  model = hf.load(src)
  assert model.cfg.rope_scaling[:3] == ("yarn", 4.0, 16)
  ids = np.random.RandomState(7).randint(0, 64, (2, 40))
  mask = np.ones_like(ids)
  mask[1, :6] = 0
  real = mask.astype(bool)
  assert np.abs(np.asarray(hf.forward(model, ids, mask)) - _hf_logits(ref, ids, mask))[real].max() < TOL
  out = str(tmp_path / "out")
  hf_export.save(out, model.cfg, nnx.split(model)[1].to_pure_dict())
  assert hf.read_config(out)["rope_parameters"]["rope_type"] == "yarn"
  assert hf.load(out).cfg.rope_scaling == model.cfg.rope_scaling
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert back.model.rotary_emb.attention_scaling == ref.model.rotary_emb.attention_scaling
  np.testing.assert_array_equal(back.model.rotary_emb.inv_freq.numpy(), ref.model.rotary_emb.inv_freq.numpy())
  assert np.abs(_hf_logits(back, ids, mask) - _hf_logits(ref, ids, mask))[real].max() < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_to_transformers(checkpoints, kind, tmp_path):
  path, ref = checkpoints[kind]
  model = hf.load(path)
  params = nnx.split(model)[1].to_pure_dict()
  out = str(tmp_path / "export")
  hf_export.save(out, model.cfg, params, tokenizer=hf_tokenizer.load(path), tokenizer_dir=path)
  back = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert type(back) is type(ref)
  ids, mask = _batch(model.cfg.vocab_size, seed=2)
  real = mask.astype(bool)
  ours = np.asarray(hf.forward(model, ids, mask))
  assert np.abs(_hf_logits(back.eval(), ids, mask) - ours)[real].max() < TOL
  assert np.abs(_hf_logits(back, ids) - _hf_logits(ref, ids)).max() < TOL
  # Import of the export is exact.
  again = nnx.split(hf.load(out))[1].to_pure_dict()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again, params)


@pytest.mark.parametrize("kind", ("gpt2", "llama", "qwen2"))
def test_reward_model_exports_as_sequence_classification(checkpoints, kind, tmp_path):
  path, _ = checkpoints[kind]
  cfg = hf.load(path).cfg
  graphdef, state = nnx.split(ScalarModel(cfg, 0.3, rngs=nnx.Rngs(3)))
  params = state.to_pure_dict()
  params["trunk"] = nnx.split(hf.load(path))[1].to_pure_dict()["trunk"]
  params["head_bias"] = jnp.asarray(0.7, jnp.float32)  # a folded normalisation bias
  state.replace_by_pure_dict(params)
  rm = nnx.merge(graphdef, state)
  out = str(tmp_path / "rm")
  tok = hf_tokenizer.load(path)
  hf_export.save(out, cfg, params, "scalar", tokenizer=tok, tokenizer_dir=path)
  back = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert type(back).__name__.endswith("ForSequenceClassification") and back.config.num_labels == 1
  # Right-padded with a pad id that is no real token here: transformers reads the last non-pad token.
  ids, _ = _batch(cfg.vocab_size, seed=3)
  ids = np.where(ids == tok.pad_id, tok.pad_id + 1, ids)
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  mask[2, 5:] = 0
  ids = np.where(mask > 0, ids, tok.pad_id)
  ours = np.asarray(rm(jnp.asarray(ids), jnp.asarray(mask)))
  with torch.no_grad():
    theirs = back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()[:, 0]
  # GPT-2: the bias is folded into ln_f; Llama's score has no bias, so config.json carries it.
  bias = hf.read_config(out).get(hf.SCORE_BIAS_KEY, 0.0)
  assert bias == (0.0 if kind == "gpt2" else pytest.approx(0.7))
  assert np.abs(theirs + bias - ours).max() < TOL
  # And it reads back as our reward model.
  again = hf.load(out, kind="scalar")
  assert np.abs(np.asarray(again(jnp.asarray(ids), jnp.asarray(mask))) - ours).max() < TOL


def _copy_without(src, dst, drop=(), replace=None):
  shutil.copytree(src, dst)
  tensors = load_file(os.path.join(dst, "model.safetensors"))
  for name in drop:
    del tensors[name]
  tensors.update(replace or {})
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  return str(dst)


def test_clear_errors(checkpoints, tmp_path):
  gpt2, _ = checkpoints["gpt2"]
  llama, _ = checkpoints["llama"]
  bert = tmp_path / "bert"
  bert.mkdir()
  (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
  with pytest.raises(hf.HFError, match=r"model_type 'bert' is not supported; supported: gpt2, llama, mistral, qwen2"):
    hf.load(str(bert))
  missing = _copy_without(gpt2, tmp_path / "missing", drop=["transformer.h.1.mlp.c_fc.bias"])
  with pytest.raises(hf.HFError, match=r"tensor 'transformer.h.1.mlp.c_fc.bias' is missing"):
    hf.load(missing)
  wrong = _copy_without(gpt2, tmp_path / "wrong", replace={"transformer.wpe.weight": np.zeros((32, 32), np.float32)})
  with pytest.raises(hf.HFError, match=r"'transformer.wpe.weight' has shape \(32, 32\), but config.json implies "
                     r"\(64, 32\)"):
    hf.load(wrong)
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  shutil.copy(os.path.join(gpt2, "config.json"), pickled)
  (pickled / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(hf.HFError, match="pickled weights are never read"):
    hf.load(str(pickled))
  scaled = tmp_path / "scaled"
  shutil.copytree(llama, scaled)
  config = json.loads((scaled / "config.json").read_text())
  config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 4.0}
  (scaled / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf.HFError, match=r"RoPE scaling 'dynamic' is not supported \(supported: default, linear"):
    hf.load(str(scaled))
  with pytest.raises(hf.HFError, match="GPT2LMHeadModel, not a reward model"):
    hf.load(gpt2, kind="scalar")


def test_qwen2_qkv_biases(checkpoints, tmp_path):
  """The q/k/v biases (and no others) are read, stacked under scan_layers, and written back as Qwen2's."""
  path, ref = checkpoints["qwen2"]
  attn = ref.model.layers[1].self_attn
  assert attn.o_proj.bias is None and ref.model.layers[1].mlp.up_proj.bias is None
  assert all(getattr(attn, f"{n}_proj").bias.abs().min() > 0 for n in "qkv")
  model = hf.load(path)
  ours = model.trunk.blocks[1].attn
  assert not hasattr(ours, "bo") and not hasattr(model.trunk.blocks[1].mlp, "b_in")
  np.testing.assert_array_equal(np.asarray(ours.bq[...]), attn.q_proj.bias.detach().numpy().reshape(4, 8))
  np.testing.assert_array_equal(np.asarray(ours.bk[...]), attn.k_proj.bias.detach().numpy().reshape(2, 8))
  np.testing.assert_array_equal(np.asarray(ours.bv[...]), attn.v_proj.bias.detach().numpy().reshape(2, 8))
  ids, mask = _batch(model.cfg.vocab_size, seed=5)
  scanned = hf.load(path, scan_layers=True)
  assert scanned.trunk.blocks.attn.bq[...].shape == (2, 4, 8)
  np.testing.assert_allclose(np.asarray(hf.forward(scanned, ids, mask)), np.asarray(hf.forward(model, ids, mask)),
                             atol=1e-5)
  out = str(tmp_path / "out")
  hf_export.save(out, model.cfg, nnx.split(model)[1].to_pure_dict())
  config = hf.read_config(out)
  assert (config["model_type"], config["architectures"], config["use_sliding_window"]) == (
      "qwen2", ["Qwen2ForCausalLM"], False)
  biases = sorted(k for k in load_file(os.path.join(out, "model.safetensors")) if k.endswith(".bias"))
  assert biases == [f"model.layers.{i}.self_attn.{n}_proj.bias" for i in range(2) for n in "kqv"]


def test_qwen2_sequence_classification_reads_as_reward_model(tmp_path):
  """A one-label Qwen2ForSequenceClassification made by transformers scores as our ScalarModel does."""
  config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=True, num_labels=1, pad_token_id=0)
  ref = _perturb(transformers.Qwen2ForSequenceClassification(config))
  ref.save_pretrained(str(tmp_path / "rm"))
  rm = hf.load(str(tmp_path / "rm"), kind="scalar")
  assert isinstance(rm, ScalarModel) and rm.cfg.qkv_bias
  # Right-padded with pad id 0, which no real token uses: transformers scores the last non-pad token.
  ids = np.random.RandomState(6).randint(1, 64, (3, 12))
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  mask[2, 4:] = 0
  ids = np.where(mask > 0, ids, 0)
  with torch.no_grad():
    theirs = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()[:, 0]
  assert np.abs(np.asarray(rm(jnp.asarray(ids), jnp.asarray(mask))) - theirs).max() < TOL


def test_qwen2_sliding_window_is_refused(tmp_path):
  """A window shorter than the context on some layer is refused; one that is off (released Qwen2 configs carry
  a window with use_sliding_window false) or covers no layer is not."""
  config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    use_sliding_window=True, sliding_window=8, max_window_layers=1)
  transformers.Qwen2ForCausalLM(config).save_pretrained(str(tmp_path / "sw"))
  with pytest.raises(hf.HFError, match=r"qwen2 checkpoint with config.json use_sliding_window=true and "
                     r"sliding_window=8 < max_position_embeddings=64 \(layers \[1\]"):
    hf.load(str(tmp_path / "sw"))
  saved = hf.read_config(str(tmp_path / "sw"))
  assert hf.decoder_config({**saved, "use_sliding_window": False}).qkv_bias
  assert hf.decoder_config({**saved, "sliding_window": 64}).max_len == 64
  legacy = {k: v for k, v in saved.items() if k != "layer_types"}  # older files: max_window_layers says which
  hf.decoder_config({**legacy, "max_window_layers": 2})
  with pytest.raises(hf.HFError, match=r"layers \[0, 1\]"):
    hf.decoder_config({**legacy, "max_window_layers": 0})


def test_qkv_bias_is_llama_only():
  with pytest.raises(ValueError, match=r"model.qkv_bias applies to the llama flavour only"):
    DecoderConfig(vocab_size=64, flavour="gpt2", qkv_bias=True)
  with pytest.raises(ValueError, match=r"model.qkv_bias"):
    DecoderConfig.from_mapping({"vocab_size": 64, "qkv_bias": True})  # gpt2 is the default flavour
  llama = DecoderConfig(vocab_size=64, flavour="llama", num_layers=1, d_model=32, num_heads=4, num_kv_heads=2,
                        d_ff=64, qkv_bias=True)
  attn = nnx.split(Decoder(llama, rngs=nnx.Rngs(0)))[1].to_pure_dict()["trunk"]["blocks"][0]["attn"]
  assert sorted(attn) == ["bk", "bq", "bv", "wk", "wo", "wq", "wv"]


def test_tokenizers(checkpoints, tmp_path):
  gpt2, _ = checkpoints["gpt2"]
  tok = hf_tokenizer.load(gpt2)  # vocab.json + merges.txt: byte-level BPE via `tokenizers`
  text = "Hello world, 12 + 30 = 42! Ünïcødé ok"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 0)  # GPT-2: <|endoftext|> for all three
  assert ids == transformers.AutoTokenizer.from_pretrained(gpt2)(text)["input_ids"]
  llama, _ = checkpoints["llama"]
  stok = hf_tokenizer.load(llama)  # tokenizer.model: sentencepiece
  assert (stok.bos_id, stok.eos_id, stok.unk_id) == (1, 2, 0)
  assert stok.pad_id == stok.eos_id  # no pad token: pad with EOS (masked anyway)
  assert stok.decode(stok.encode("the quick fox")) == "the quick fox"


def test_convert_command_round_trip(checkpoints, tmp_path, capsys):
  path, ref = checkpoints["llama"]
  ours, out = str(tmp_path / "ours"), str(tmp_path / "back")
  assert cli.main(["convert", f"--from-hf={path}", f"--out={ours}"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["kind"] == "lm" and summary["flavour"] == "llama" and "tokenizer.model" in summary["tokenizer_files"]
  assert os.path.isdir(os.path.join(ours, "params"))
  assert cli.main(["convert", "--to-hf", f"--from={ours}", f"--out={out}"]) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids, _ = _batch(ref.config.vocab_size)
  assert np.abs(_hf_logits(back, ids) - _hf_logits(ref, ids)).max() < TOL
  assert os.path.isfile(os.path.join(out, "tokenizer.model"))
  assert cli.main(["convert", f"--from-hf={tmp_path}", f"--out={tmp_path / 'x'}"]) == 2
  assert "no config.json" in capsys.readouterr().err
  assert cli.main(["convert", "--to-hf", f"--out={out}"]) == 2


def _hf_run_config(path, **sft):
  config = load_config(f"{ROOT}/configs/quickstart.py:hf={path}")
  config.stages = "tokenizer,sft"
  config.sft.update(dict(steps=2, batch_size=4, log_every=1, **sft))
  config.evaluation.update(dict(num_prompts=4, lm_loss_batches=1))
  config.data.update(dict(prompt_len=16, response_len=8, seq_len=24))
  config.evaluation.sampling.max_new_tokens = 8
  return config


def test_sft_stage_from_hf_checkpoint_with_its_tokenizer(checkpoints, tmp_path):
  path, _ = checkpoints["gpt2"]
  config = _hf_run_config(path)
  assert config.sft.init_from == f"hf:{path}" and "pretrain" not in config.stages
  assert config.model.num_layers == 2 and config.model.d_model == 32 and config.model.tie_embeddings
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  sft = [r for r in rows if r["stage"] == "sft" and "train/loss" in r]
  assert [r["step"] for r in sft] == [1, 2] and all(np.isfinite(r["train/loss"]) for r in sft)
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["tokenizer"]["tokenizer/vocab_size"] == hf_tokenizer.load(path).vocab_size
  assert not os.path.exists(os.path.join(workdir, "tokenizer", "spm.model"))  # nothing trained
  # The trained policy goes back to transformers with the checkpoint's tokenizer.
  out = str(tmp_path / "sft_hf")
  assert cli.main(["convert", "--to-hf", f"--from={workdir}/sft", f"--out={out}"]) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert {"vocab.json", "merges.txt"} <= set(os.listdir(out))
  trained = hf.load(out)
  ids, mask = _batch(trained.cfg.vocab_size)
  real = mask.astype(bool)
  assert np.abs(_hf_logits(back, ids, mask) - np.asarray(hf.forward(trained, ids, mask)))[real].max() < TOL


def test_run_from_hf_checkpoint_rejects_bad_combinations(checkpoints, tmp_path):
  path, _ = checkpoints["gpt2"]
  config = _hf_run_config(path)
  config.model.num_layers = 4
  with pytest.raises(Exception, match=r"model.num_layers=4 \(checkpoint: 2\)"):
    pipeline.run(config, str(tmp_path / "a"))
  config = _hf_run_config(path)
  config.tokenizer.path = "/some/spm.model"
  with pytest.raises(Exception, match="uses that checkpoint's tokenizer"):
    pipeline.run(config, str(tmp_path / "b"))
  llama, _ = checkpoints["llama"]
  config = _hf_run_config(path)
  config.stages = "pretrain"
  config.pretrain.init_from = f"hf:{llama}"
  with pytest.raises(Exception, match="differ in architecture"):
    pipeline.run(config, str(tmp_path / "c"))
