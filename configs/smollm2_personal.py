"""Personal-adapter training config: many users' LoRA adapters on one base.

Variants (`--config=configs/smollm2_personal.py:<variant>`):
  tiny     a random 2-layer model with the byte tokenizer (tests, CI).
  smollm2  SmolLM2-135M-Instruct from the bundled GGUF file.
  demo     SmolLM2 tuned for `make demo` (mintjax.apps.demo): short raw
           prompts in one 12-token bucket, the LM head on a 6-token
           completion window, no remat, few steps at a high learning rate,
           so 64 users train in a few minutes on a 2-core CPU.
  demo_tiny  the same recipe on the random tiny model (`--quick`, tests).
Override any field, e.g. `--config.lora.rank=4 --config.train_data=...`;
`mintjax-train --config_help` lists every field with its meaning. The
training data formats are in docs/API.md (examples/train_*.jsonl).
"""

import ml_collections

# Fields a training run cannot start without (named in the error).
REQUIRED = ("train_data", "registry")

HELP = {
    "base": "base model: 'smollm2' (embedded), 'random:<variant>', a .gguf "
            "file, a Hugging Face folder or a converted checkpoint",
    "base_seed": "initialisation seed of a 'random:<variant>' base",
    "train_data": "training JSONL: one .jsonl file or a directory of them "
                  "(formats: docs/API.md, examples/train_*.jsonl)",
    "heldout_data": "held-out JSONL in the same formats; evaluated and "
                    "recorded with each published revision (optional)",
    "registry": "registry directory the adapters are published to "
                "(created when missing)",
    "lora.rank": "LoRA rank r",
    "lora.alpha": "LoRA alpha (scale alpha/r, or alpha/sqrt(r) with rslora)",
    "lora.targets": "projections adapted: any of q,k,v,o,gate,up,down",
    "lora.use_rslora": "scale by alpha/sqrt(r) instead of alpha/r",
    "num_slots": "bank slots per cohort; slot 0 is the null adapter, so "
                 "num_slots-1 users train together",
    "batch_size": "examples per step (global, mixed over the cohort's users)",
    "steps_per_cohort": "optimizer steps per cohort of users",
    "seed": "data order and initialisation seed",
    "max_length": "longest example in tokens (see overflow)",
    "buckets": "padded lengths a batch is rounded up to (fewer compiles)",
    "overflow": "an example longer than max_length: 'truncate' (warned) or "
                "'error'",
    "prompt_style": "'raw' (prompt text as is) or 'chat' (the base's chat "
                    "template); chat records are always templated",
    "optimizer.learning_rate": "peak learning rate",
    "optimizer.warmup_steps": "linear warm-up steps",
    "optimizer.decay_steps": "decay steps after warm-up (0: none)",
    "optimizer.schedule": "'constant', 'cosine' or 'linear'",
    "optimizer.min_lr_ratio": "final learning rate / peak",
    "optimizer.b1": "AdamW beta1",
    "optimizer.b2": "AdamW beta2",
    "optimizer.eps": "AdamW epsilon",
    "optimizer.weight_decay": "AdamW weight decay",
    "optimizer.clip_norm": "per-adapter gradient clip norm (0: off)",
    "mesh.data": "mesh 'data' axis size",
    "mesh.fsdp": "mesh 'fsdp' axis size (-1: the remaining devices)",
    "mesh.tensor": "mesh 'tensor' axis size",
    "lora_impl": "gather-LoRA implementation ('auto' picks per backend)",
    "remat": "rematerialise layers in the backward pass (less memory)",
    "loss_window": "0: LM head on every position; W: only on W positions "
                   "from each row's first completion token",
    "continue_from_registry": "start a user from their latest published "
                              "revision (False: from scratch)",
    "checkpoint_every": "steps between Orbax checkpoints in --workdir",
    "keep_checkpoints": "checkpoints kept in --workdir",
    "async_checkpoint": "write checkpoints in the background",
    "log_every": "steps between metrics.jsonl lines (and INFO logs)",
    "eval_batch_size": "batch size of the held-out evaluation",
}


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = "random:tiny"
  c.base_seed = 0
  c.train_data = ""      # a directory of *.jsonl or one .jsonl file
  c.heldout_data = ""    # same format; optional
  c.registry = ""        # registry directory
  c.lora = ml_collections.ConfigDict(dict(
      rank=4, alpha=8.0, targets="q,k,v,o", use_rslora=False))
  c.num_slots = 9        # slot 0 is the null adapter: 8 users per cohort
  c.batch_size = 16
  c.steps_per_cohort = 20
  c.seed = 0
  c.max_length = 64
  c.buckets = (32, 64)
  c.overflow = "truncate"
  c.prompt_style = "raw"
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=0, decay_steps=0, schedule="constant",
      min_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      clip_norm=1.0))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.lora_impl = "auto"
  c.remat = False
  c.loss_window = 0      # 0: LM head on every position; W: only on W
                         # positions from each row's first completion target
  c.continue_from_registry = True
  c.checkpoint_every = 10
  c.keep_checkpoints = 2
  c.async_checkpoint = True
  c.log_every = 5
  c.eval_batch_size = 16
  if variant == "tiny":
    pass
  elif variant == "smollm2":
    c.base = "smollm2"  # the embedded GGUF: no path to type
    c.prompt_style = "chat"
    c.max_length = 96
    c.buckets = (48, 96)
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.optimizer.learning_rate = 2e-3
    c.steps_per_cohort = 60
    c.remat = True
  elif variant in ("demo", "demo_tiny"):
    if variant == "demo":
      c.base = "smollm2"
    c.prompt_style = "raw"
    c.max_length = 16
    c.buckets = (12, 16)
    c.loss_window = 6
    c.lora.rank = 4
    c.lora.alpha = 8.0
    c.lora.targets = "q,k,v,o"
    # Measured (8 users x 3 facts, held-out exact match): a constant 1e-2
    # diverges for some users; a constant 3e-3 is 100% on some user sets
    # but 42% on the 8 users a 64-user run left worst; warm-up + cosine
    # decay lifts those to 83% (peak 3e-3) and 92% (peak 5e-3).
    c.optimizer.learning_rate = 5e-3
    c.optimizer.warmup_steps = 3
    c.optimizer.schedule = "cosine"
    c.optimizer.decay_steps = 37
    c.optimizer.min_lr_ratio = 0.05
    # 30 steps left 1-3 of 64 users at 0% held-out; 40 steps cost ~45 s more.
    c.steps_per_cohort = 40
    c.remat = False
    c.checkpoint_every = 1000  # one checkpoint at the cohort's end
    c.log_every = 5
    c.eval_batch_size = 32
    if variant == "demo_tiny":
      # The byte tokenizer spends one token per character.
      c.max_length = 48
      c.buckets = (48,)
      c.loss_window = 12
      # A random base's std-0.02 tied head cannot produce peaked logits, so
      # no adapter on it gets exact answers: this variant checks the
      # plumbing (train, publish, serve), not the accuracy.
      c.steps_per_cohort = 20
      c.optimizer.decay_steps = 17
  else:
    raise ValueError(f"unknown variant {variant!r}; choose 'tiny', "
                     "'smollm2', 'demo' or 'demo_tiny'")
  return c
