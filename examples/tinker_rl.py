"""(b) GRPO-style RL on personal preferences through the official SDK.

Each user has a favourite colour and rewards answers that use it. Every
step, each user (its own ServiceClient and training client, in its own
thread):
  1. saves its adapter for sampling (`save_weights_and_get_sampling_client`),
  2. samples a group of G completions per prompt (temperature 1) and scores
     them with its own reward,
  3. turns rewards into group-relative advantages (reward - group mean) and
     trains with the `importance_sampling` loss (the sampler's per-token
     log-probabilities travel in `loss_fn_inputs['logprobs']`),
  4. takes an `optim_step`.
The service batches the users' concurrent forward_backward and optim_step
requests into shared compiled steps, and their samples into shared decode
batches.

Prompts: three questions about colour that list the nine colours to choose
from, each put through the base's chat template (when it has one) with the
start of the assistant's answer appended ("My favourite colour is"), so an
instruct model answers with one of the colours within a few tokens; each
user must learn to pick its own.

Reward of a completion for a user whose colour is c: 1.0 when c appears in
it as a word, else 0.2 x the longest start of c that one of its words starts
with, as a fraction of c (a dense term, so that even a random model gets a
learning signal, and one that leads towards the word itself; kept small, or
the policy settles on a start such as 'grey' for green). Every
user rewards only its own colour: the summary's `cross_reward` scores each
user's last samples under every user's colour (the diagonal should lead).

Checks reported per step: `ratio_dev`, the largest |log p_train - log q|
over the sampled tokens, from the forward-backward's own log-probabilities
(the sampler's and the trainer's log-probabilities of the same tokens must
agree before the update, else the importance weights are wrong).

Isolation: a bystander training client, created first and never trained,
is saved before and after everyone else's training; its two revisions'
log-probabilities on a probe are compared bit for bit (`forward`).

  TINKER_BASE_URL=http://127.0.0.1:8001 TINKER_API_KEY=tml-local \
      python examples/tinker_rl.py --users 4 --steps 12 --json_out rl.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import time

import numpy as np
import tinker
from tinker import types

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink",
           "black", "white")
DENSE = 0.2  # the dense term's weight: well below a hit (1.0)
OPTIONS = " Choose one of: " + ", ".join(COLOURS) + "."
# (user message, start of the assistant's answer). The options make every
# colour a likely answer of the base; which one a user rewards is its own.
PROMPTS = (("What is your favourite colour?" + OPTIONS,
            "My favourite colour is"),
           ("What colour should I paint my room?" + OPTIONS,
            "I would paint it"),
           ("Which colour should my new car be?" + OPTIONS,
            "Your new car should be"))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--users", type=int, default=4)
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--group", type=int, default=8, help="samples per prompt")
  p.add_argument("--max_tokens", type=int, default=6)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--base_model", default="")
  p.add_argument("--json_out", default="")
  return p.parse_args(argv)


def reward(text: str, colour: str) -> float:
  words = re.findall(r"[a-z]+", text.lower())
  if colour in words:
    return 1.0
  # Dense term: the longest start of the colour that some word starts with
  # ('gre' in 'great' for green), so partial answers point at the colour.
  # (A first version scored the share of letters that are letters of the
  # colour; the policy learned to repeat 'never' for green.)
  best = 0
  for w in words:
    n = 0
    while n < min(len(w), len(colour)) and w[n] == colour[n]:
      n += 1
    best = max(best, n)
  return DENSE * best / len(colour)


def prompt_tokens(tok, question: str, answer_start: str) -> list[int]:
  """The chat-formatted question + the answer's first words (token ids)."""
  if getattr(tok, "chat_template", None):
    text = tok.apply_chat_template([{"role": "user", "content": question}],
                                   add_generation_prompt=True, tokenize=False)
    return tok.encode(text + answer_start, add_special_tokens=False)
  return tok.encode(answer_start, add_special_tokens=False)


def rl_step(tc, tok, colour: str, args, *, user: int, step: int) -> dict:
  """One GRPO step for one user: its mean reward, its texts, ratio check."""
  sampler = tc.save_weights_and_get_sampling_client().result()
  prompts = [prompt_tokens(tok, q, a) for q, a in PROMPTS]
  futs = [sampler.sample(types.ModelInput.from_ints(p),
                         num_samples=args.group,
                         sampling_params=types.SamplingParams(
                             max_tokens=args.max_tokens, temperature=1.0,
                             seed=(args.seed * 100003 + user * 7919 + step * 101
                                   + i)))
          for i, p in enumerate(prompts)]
  data, rewards, texts, sampled_q = [], [], [], []
  for p, f in zip(prompts, futs):
    seqs = f.result().sequences
    txt = [tok.decode(s.tokens, skip_special_tokens=True) for s in seqs]
    texts += txt
    r = np.array([reward(t, colour) for t in txt], np.float32)
    rewards += list(r)
    adv = r - r.mean()
    for s, a in zip(seqs, adv):
      if not s.tokens or a == 0.0:
        continue  # no signal
      ids = p + list(s.tokens)
      n_p = len(p) - 1  # prompt targets carry no advantage
      data.append(types.Datum(
          model_input=types.ModelInput.from_ints(ids[:-1]),
          loss_fn_inputs={
              "target_tokens": ids[1:],
              "logprobs": [0.0] * n_p + list(s.logprobs),
              "advantages": [0.0] * n_p + [float(a)] * len(s.tokens)}))
      sampled_q.append((n_p, np.asarray(s.logprobs, np.float32)))
  ratio_dev = 0.0
  if data:
    fb = tc.forward_backward(data, "importance_sampling")
    opt = tc.optim_step(types.AdamParams(learning_rate=args.lr))
    out = fb.result()
    opt.result()
    for o, (n_p, q) in zip(out.loss_fn_outputs, sampled_q):
      logp = np.asarray(o["logprobs"].data, np.float32)[n_p:]
      ratio_dev = max(ratio_dev, float(np.abs(logp - q).max()))
  return {"reward": float(np.mean(rewards)), "texts": texts,
          "ratio_dev": ratio_dev}


def run_user(user: int, colour: str, args, base: str) -> dict:
  sc = tinker.ServiceClient()
  tc = sc.create_lora_training_client(base_model=base, rank=args.rank,
                                      seed=args.seed + user).result()
  tok = tc.get_tokenizer()
  steps = [rl_step(tc, tok, colour, args, user=user, step=s)
           for s in range(args.steps)]
  curve = [s["reward"] for s in steps]
  k = max(1, args.steps // 4)
  return {"user": f"user{user}", "colour": colour, "model_id": tc.model_id,
          "reward_curve": [round(x, 3) for x in curve],
          "reward_first": float(np.mean(curve[:k])),
          "reward_last": float(np.mean(curve[-k:])),
          "ratio_dev_max": round(max(s["ratio_dev"] for s in steps), 5),
          "last_texts": steps[-1]["texts"],
          "last_samples": steps[-1]["texts"][:args.group]}


def probe_logprobs(tc, tok) -> list[float]:
  ids = tok.encode("My favourite colour is blue", add_special_tokens=False)
  datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                      loss_fn_inputs={"target_tokens": ids[1:]})
  out = tc.forward([datum], "cross_entropy").result()
  return list(out.loss_fn_outputs[0]["logprobs"].data)


def main(argv=None) -> dict:
  args = parse_args(argv)
  sc = tinker.ServiceClient()
  base = args.base_model or sc.get_server_capabilities(
  ).supported_models[0].model_name
  bystander = sc.create_lora_training_client(base_model=base, rank=args.rank,
                                             seed=12345).result()
  btok = bystander.get_tokenizer()
  before = probe_logprobs(bystander, btok)
  rng = np.random.default_rng(args.seed)
  colours = [COLOURS[i] for i in rng.permutation(len(COLOURS))[:args.users]]
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(args.users) as pool:
    per_user = [f.result() for f in [
        pool.submit(run_user, u, c, args, base) for u, c in enumerate(colours)]]
  after = probe_logprobs(bystander, btok)
  # Each user's last samples scored under every user's colour.
  for u in per_user:
    u["cross_reward"] = {v["colour"]: round(float(np.mean(
        [reward(t, v["colour"]) for t in u["last_texts"]])), 3)
                         for v in per_user}
    del u["last_texts"]
  out = {"base_model": base, "users": args.users, "steps": args.steps,
         "group": args.group, "wall_s": round(time.perf_counter() - t0, 1),
         "rose_for_users": sum(u["reward_last"] > u["reward_first"]
                               for u in per_user),
         "own_colour_leads_for_users": sum(
             u["cross_reward"][u["colour"]] > max(
                 (v for c, v in u["cross_reward"].items()
                  if c != u["colour"]), default=-1.0)
             for u in per_user),
         "bystander_unchanged": before == after, "per_user": per_user}
  print(json.dumps(out, indent=1))
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
