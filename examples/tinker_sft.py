"""(a) Supervised fine-tuning of personal adapters through the official SDK.

N users (default 8), each with its own `tinker.ServiceClient` and LoRA
training client running in its own thread, learn their personal facts
(`mintjax.apps.personal_data`, the data `make demo` trains on: 3 facts a
user, 3 training phrasings each, 1 held-out paraphrase). Every user sends
`forward_backward` + `optim_step` each step; the service batches the users'
concurrent requests into one compiled multi-tenant step. At the end each user
saves a sampler and is scored by greedy sampling: held-out exact match
(completion == the fact) as in `make demo`.

Talks to the server only through `tinker` (TINKER_BASE_URL, any API key
starting with 'tml-'):

  TINKER_BASE_URL=http://127.0.0.1:8001 TINKER_API_KEY=tml-local \
      python examples/tinker_sft.py --users 8 --steps 40 --json_out sft.json

Prints one JSON summary (per-user loss curve and exact match).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import time

import tinker
from tinker import types

from mintjax.apps.personal_data import make_personal_data


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--users", type=int, default=8)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--rank", type=int, default=4)
  p.add_argument("--lr", type=float, default=1.5e-3,
                 help="peak learning rate (warm-up 3 steps, cosine decay)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--base_model", default="",
                 help="default: the first model the server lists")
  p.add_argument("--json_out", default="")
  return p.parse_args(argv)


def learning_rate(step: int, steps: int, peak: float) -> float:
  """Warm-up 3 steps, then cosine decay to 5% (the demo's schedule)."""
  if step < 3:
    return peak * (step + 1) / 3
  t = min(1.0, (step - 3) / max(1, steps - 3))
  return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def prompt_ids(tok, prompt: str) -> list[int]:
  bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
  return bos + tok.encode(prompt, add_special_tokens=False)


def make_datum(tok, rec: dict) -> types.Datum:
  """prompt + completion + eos; weights 1 on the completion's targets."""
  p = prompt_ids(tok, rec["prompt"])
  c = tok.encode(rec["completion"], add_special_tokens=False) + [
      tok.eos_token_id]
  ids = p + c
  weights = [1.0 if i + 1 >= len(p) else 0.0 for i in range(len(ids) - 1)]
  return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                     loss_fn_inputs={"target_tokens": ids[1:],
                                     "weights": weights})


def exact_match(sampler, tok, recs: list[dict]) -> float:
  """Greedy completion (to eos, at most 8 tokens) equals the fact."""
  futs = [sampler.sample(types.ModelInput.from_ints(prompt_ids(tok, r["prompt"])),
                         num_samples=1,
                         sampling_params=types.SamplingParams(
                             max_tokens=8, temperature=0.0))
          for r in recs]
  hits = 0
  for r, f in zip(recs, futs):
    text = tok.decode(f.result().sequences[0].tokens, skip_special_tokens=True)
    hits += text.strip() == r["completion"].strip()
  return hits / len(recs)


def train_user(user: str, train: list[dict], held: list[dict], args,
               base_model: str) -> dict:
  sc = tinker.ServiceClient()
  tc = sc.create_lora_training_client(base_model=base_model, rank=args.rank,
                                      train_mlp=False, seed=args.seed
                                      ).result()
  tok = tc.get_tokenizer()
  data = [make_datum(tok, r) for r in train]
  n_tok = sum(sum(d.loss_fn_inputs["weights"].data) for d in data)
  losses = []
  for step in range(args.steps):
    fb = tc.forward_backward(data, "cross_entropy")
    opt = tc.optim_step(types.AdamParams(
        learning_rate=learning_rate(step, args.steps, args.lr), beta1=0.9,
        beta2=0.999, eps=1e-8))
    losses.append(fb.result().metrics["loss:sum"] / n_tok)
    opt.result()
  sampler = tc.save_weights_and_get_sampling_client().result()
  return {"user": user, "model_id": tc.model_id,
          "loss_first": losses[0], "loss_last": losses[-1],
          "loss_curve": [round(x, 4) for x in losses],
          "train_em": exact_match(sampler, tok, train),
          "heldout_em": exact_match(sampler, tok, held)}


def main(argv=None) -> dict:
  args = parse_args(argv)
  base = args.base_model or tinker.ServiceClient().get_server_capabilities(
  ).supported_models[0].model_name
  train, held, _ = make_personal_data(args.users, seed=args.seed)
  users = sorted({r["user"] for r in train})
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(len(users)) as pool:
    futs = [pool.submit(train_user, u, [r for r in train if r["user"] == u],
                        [r for r in held if r["user"] == u], args, base)
            for u in users]
    per_user = [f.result() for f in futs]
  mean = lambda k: sum(u[k] for u in per_user) / len(per_user)
  out = {"base_model": base, "users": len(users), "steps": args.steps,
         "rank": args.rank, "wall_s": round(time.perf_counter() - t0, 1),
         "heldout_em_mean": mean("heldout_em"),
         "heldout_em_worst": min(u["heldout_em"] for u in per_user),
         "train_em_mean": mean("train_em"),
         "loss_first_mean": mean("loss_first"),
         "loss_last_mean": mean("loss_last"), "per_user": per_user}
  print(json.dumps(out, indent=1))
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
