"""transformers + PEFT side of the peer benchmark: timed greedy batches.

Runs inside the peer venv (`make peer-venv`) or the parity venv, started by
`tools/peer_env.run_peer`; mintjax never imports this file. The same job
format as `tools/peer_vllm.py`:

  .venv-peer/bin/python tools/peer_hf.py JOB.json

JOB.json: {"model": HF folder, "prompts": [[token ids], ...] (B rows, one
length), "new_tokens": int, "repeats": int, "threads": int,
"runs": {name: [PEFT folder or null per row]}}.

Prints one line, "PEER_RESULT " + JSON: {"torch", "transformers", "peft":
versions, "load_s", "runs": {name: {"seconds": best wall s, "tokens":
[[greedy ids], ...]}}}.
Mixed batches go through PEFT's `generate(adapter_names=[...])`, base rows
as "__base__"; each run is generated once untimed first.
"""

from __future__ import annotations

import json
import sys
import time

# run_peer reads the line that starts with this (libraries print too).
RESULT_PREFIX = "PEER_RESULT "


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise SystemExit("usage: peer_hf.py JOB.json")
  with open(argv[1]) as f:
    job = json.load(f)
  # pylint: disable=g-import-not-at-top  # heavy; only in the peer process
  import peft
  import torch
  import transformers

  torch.set_num_threads(job["threads"])
  t0 = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      job["model"], dtype=torch.float32).eval()
  folders = sorted({f for rows in job["runs"].values() for f in rows
                    if f is not None})
  names = {f: f"a{i}" for i, f in enumerate(folders)}
  if folders:
    model = peft.PeftModel.from_pretrained(model, folders[0],
                                           adapter_name=names[folders[0]])
    for f in folders[1:]:
      model.load_adapter(f, adapter_name=names[f])
    model.eval()  # PEFT refuses adapter_names in training mode
  load_s = time.perf_counter() - t0
  ids = torch.tensor(job["prompts"])

  def generate(rows, n):
    kw = {}
    if folders:
      kw["adapter_names"] = [names.get(r, "__base__") for r in rows]
    x = ids[[i % len(ids) for i in range(len(rows))]]
    with torch.no_grad():
      t = time.perf_counter()
      out = model.generate(x, attention_mask=torch.ones_like(x),
                           max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, **kw)
      s = time.perf_counter() - t
    return s, out[:, x.shape[1]:].tolist()

  runs = {}
  for name, rows in job["runs"].items():
    generate(rows, 2)  # warm-up
    best, tokens = float("inf"), None
    for _ in range(job["repeats"]):
      s, tokens = generate(rows, job["new_tokens"])
      best = min(best, s)
    runs[name] = dict(seconds=best, tokens=tokens)
  print(RESULT_PREFIX + json.dumps(dict(torch=torch.__version__,
                        transformers=transformers.__version__,
                        peft=peft.__version__, load_s=load_s, runs=runs)))


if __name__ == "__main__":
  main(sys.argv)
