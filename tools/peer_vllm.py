"""vLLM-CPU side of the peer benchmark: one engine, timed greedy batches.

Runs inside the peer venv (`make peer-venv`), started by
`tools/peer_env.run_peer`, which sets the environment vLLM's CPU docs ask for
(tcmalloc and Intel OpenMP preloaded, VLLM_CPU_KVCACHE_SPACE,
VLLM_CPU_OMP_THREADS_BIND). mintjax never imports this file.

  .venv-peer/bin/python tools/peer_vllm.py JOB.json

JOB.json: {"model": HF folder, "dtype": "float32" | "bfloat16",
"enable_lora": bool, "max_loras": int, "max_rank": int,
"prompts": [[token ids], ...] (B rows), "new_tokens": int, "repeats": int,
"runs": {name: [PEFT folder or null per row]}, optional "max_num_seqs"
(default: the longest run)}. A run may hold more rows than `prompts`; row i
uses prompt i % B.

Prints one line, "PEER_RESULT " + JSON: {"vllm": version, "load_s": s,
"runs": {name: {"seconds": best wall s of `repeats`, "tokens": [[greedy
ids], ...]}}}.
Every run is generated once untimed first (warm-up, adapters loaded).
"""

from __future__ import annotations

import json
import sys
import time

# run_peer reads the line that starts with this (libraries print too).
RESULT_PREFIX = "PEER_RESULT "


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise SystemExit("usage: peer_vllm.py JOB.json")
  with open(argv[1]) as f:
    job = json.load(f)
  # pylint: disable=g-import-not-at-top  # a bad command line fails fast
  import vllm
  from vllm.inputs import TokensPrompt
  from vllm.lora.request import LoRARequest

  prompts = job["prompts"]
  t0 = time.perf_counter()
  kwargs = dict(enable_lora=True, max_loras=job["max_loras"],
                max_lora_rank=job["max_rank"],
                max_cpu_loras=max(job["max_loras"], 16)) if job[
                    "enable_lora"] else {}
  llm = vllm.LLM(
      model=job["model"], dtype=job["dtype"],
      # vLLM turns torch.compile off for LoRA on CPU; eager for both arms.
      enforce_eager=True, skip_tokenizer_init=True, seed=0,
      max_model_len=len(prompts[0]) + job["new_tokens"] + 8,
      max_num_seqs=job.get("max_num_seqs") or max(
          len(r) for r in job["runs"].values()), **kwargs)
  load_s = time.perf_counter() - t0
  ids: dict[str, int] = {}

  def request(folder):
    if folder is None:
      return None
    ids.setdefault(folder, len(ids) + 1)  # vLLM lora ids start at 1
    return LoRARequest(f"a{ids[folder]}", ids[folder], folder)

  def generate(rows, n):
    params = vllm.SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n,
                                 ignore_eos=True, detokenize=False)
    batch = [TokensPrompt(prompt_token_ids=prompts[i % len(prompts)])
             for i in range(len(rows))]
    t = time.perf_counter()
    out = llm.generate(batch, params, lora_request=[request(r) for r in rows],
                       use_tqdm=False)
    return time.perf_counter() - t, [list(o.outputs[0].token_ids)
                                     for o in out]

  runs = {}
  for name, rows in job["runs"].items():
    generate(rows, 2)  # warm-up: loads this run's adapters
    best, tokens = float("inf"), None
    for _ in range(job["repeats"]):
      s, tokens = generate(rows, job["new_tokens"])
      best = min(best, s)
    runs[name] = dict(seconds=best, tokens=tokens)
  print(RESULT_PREFIX + json.dumps(dict(vllm=vllm.__version__, load_s=load_s,
                                        runs=runs)))


if __name__ == "__main__":
  main(sys.argv)
