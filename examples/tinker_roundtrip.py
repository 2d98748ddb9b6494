"""(c) save_state / load_state round trip, and a sampler through OpenAI.

Through the official `tinker` SDK only:
  1. client A trains a few steps, then saves its state ('mid', weights and
     Adam state) and a sampler ('mid');
  2. client B is created from that state with its optimizer
     (`create_training_client_from_state_with_optimizer`);
  3. A and B take the same next step; their forward log-probabilities on the
     training data must then agree bit for bit (they would not if any weight,
     Adam moment or step counter had not come back exactly);
  4. A keeps training (so the live adapter moves on), and the 'mid' sampler,
     a registry revision, is sampled greedily through Tinker and through the
     OpenAI-compatible API the same process serves at /v1 (model = the
     registry ref '<model_id>:sampler-mid'); both must give the same tokens.

  TINKER_BASE_URL=http://127.0.0.1:8001 TINKER_API_KEY=tml-local \
      python examples/tinker_roundtrip.py --json_out roundtrip.json
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import tinker
from tinker import types


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--rank", type=int, default=4)
  p.add_argument("--lr", type=float, default=1e-2)
  p.add_argument("--base_model", default="")
  p.add_argument("--json_out", default="")
  return p.parse_args(argv)


def datums(tok) -> list[types.Datum]:
  out = []
  for text in ("My cat is called Mochi.", "I was born in Quito.",
               "My favourite colour is teal."):
    ids = tok.encode(text, add_special_tokens=False)
    out.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                           loss_fn_inputs={"target_tokens": ids[1:],
                                           "weights": [1.0] * (len(ids) - 1)}))
  return out


def step(tc, data, lr):
  fb = tc.forward_backward(data, "cross_entropy")
  opt = tc.optim_step(types.AdamParams(learning_rate=lr))
  out = fb.result()
  opt.result()
  return out.metrics["loss:sum"]


def logprobs(tc, data) -> np.ndarray:
  out = tc.forward(data, "cross_entropy").result()
  return np.concatenate([np.asarray(o["logprobs"].data, np.float32)
                         for o in out.loss_fn_outputs])


def openai_tokens(model: str, prompt: list[int], max_tokens: int):
  """Greedy completion token ids through the OpenAI API at $base/v1."""
  import httpx  # pylint: disable=g-import-not-at-top
  base = os.environ["TINKER_BASE_URL"].rstrip("/")
  r = httpx.post(f"{base}/v1/completions", timeout=120, json={
      "model": model, "prompt": prompt, "max_tokens": max_tokens,
      "temperature": 0.0, "logprobs": 1})
  r.raise_for_status()
  choice = r.json()["choices"][0]
  return choice["text"], choice


def main(argv=None) -> dict:
  args = parse_args(argv)
  sc = tinker.ServiceClient()
  base = args.base_model or sc.get_server_capabilities(
  ).supported_models[0].model_name
  a = sc.create_lora_training_client(base_model=base, rank=args.rank
                                     ).result()
  tok = a.get_tokenizer()
  data = datums(tok)
  losses_a = [step(a, data, args.lr) for _ in range(args.steps)]
  state = a.save_state("mid").result().path
  sampler_path = a.save_weights_for_sampler("mid").result().path

  b = sc.create_training_client_from_state_with_optimizer(state).result()
  same_at_load = bool(np.array_equal(logprobs(a, data), logprobs(b, data)))
  loss_a, loss_b = step(a, data, args.lr), step(b, data, args.lr)
  lp_a, lp_b = logprobs(a, data), logprobs(b, data)
  bit_exact = bool(np.array_equal(lp_a, lp_b)) and loss_a == loss_b

  # A moves on; the saved sampler stays where it was saved.
  for _ in range(2):
    step(a, data, args.lr)
  prompt = tok.encode("My cat is", add_special_tokens=False)
  mid = sc.create_sampling_client(model_path=sampler_path).result()
  t_seq = mid.sample(types.ModelInput.from_ints(prompt), num_samples=1,
                     sampling_params=types.SamplingParams(
                         max_tokens=6, temperature=0.0)).result().sequences[0]
  tinker_text = tok.decode(t_seq.tokens, skip_special_tokens=True)
  # tinker://<model_id>/sampler_weights/<name> is registry revision
  # '<model_id with : as .>:sampler-<name>' (docs/TINKER.md).
  model_id, _, name = sampler_path[len("tinker://"):].split("/")
  ref = f"{model_id.replace(':', '.')}:sampler-{name}"
  openai_text, _ = openai_tokens(ref, prompt, 6)
  out = {"base_model": base, "state": state, "sampler": sampler_path,
         "registry_ref": ref, "losses_a": losses_a,
         "same_logprobs_after_load": same_at_load,
         "bit_exact_after_next_step": bit_exact,
         "next_step_loss": [loss_a, loss_b],
         "tinker_text": tinker_text, "openai_text": openai_text,
         "openai_matches_tinker": openai_text == tinker_text}
  print(json.dumps(out, indent=1))
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
