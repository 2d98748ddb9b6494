"""Tinker service batching benchmark: N concurrent clients vs N sequential.

Starts the service in-process on 127.0.0.1 (tiny random base by default,
`--base smollm2` for the embedded SmolLM2-135M) and drives it with the
official `tinker` SDK. For each N in --clients, N training clients each run
--steps steps of `forward_backward` (--rows datums of --tokens tokens, cross
entropy) + `optim_step`:

  concurrent  all N clients at once, one thread each;
  sequential  the same N clients one after another (each alone on the
              service, which then does not wait for peers: batch_window_s
              is set to 0 for this part).

Reports client-steps/s and trained tokens/s of both, their ratio, and the
batching ratio: how many clients shared each compiled forward-backward and
optim call on average (the service's counters). Every row bucket is
compiled before timing (`Trainer.precompile`), and each pattern runs once
untimed first.

  python -m tools.bench_tinker --clients 1,4,16 --steps 3
  python -m tools.bench_tinker --base smollm2 --clients 1,4,16 --steps 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import tempfile
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--base", default="tiny", choices=("tiny", "smollm2"))
  p.add_argument("--clients", default="1,4,16")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--rows", type=int, default=4, help="datums per request")
  p.add_argument("--tokens", type=int, default=32, help="tokens per datum")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--window_s", type=float, default=1.0,
                 help="trainer.batch_window_s (the longest wait for peers)")
  p.add_argument("--json_out", default="")
  return p.parse_args(argv)


def start_service(args, workdir: str, max_clients: int):
  from configs import tinker_service  # pylint: disable=g-import-not-at-top
  from mintjax.apps.openai_server.server import ServerThread  # pylint: disable=g-import-not-at-top
  from mintjax.apps.tinker_service.server import build_service  # pylint: disable=g-import-not-at-top
  c = tinker_service.get_config(args.base)
  c.registry, c.state_dir = f"{workdir}/registry", f"{workdir}/state"
  c.engine.num_slots, c.engine.max_batch = 2, 8
  c.trainer.num_slots = max_clients
  c.trainer.max_rank = max(args.rank, 8)
  c.trainer.max_rows = max_clients * args.rows
  c.trainer.max_len = max(c.trainer.max_len, args.tokens)
  c.trainer.batch_window_s = args.window_s
  svc = build_service(c)
  svc.trainer.precompile(args.tokens)  # every row bucket, before timing
  server = ServerThread(svc.app).start()
  os.environ["TINKER_BASE_URL"] = f"http://127.0.0.1:{server.port}"
  os.environ.setdefault("TINKER_API_KEY", "tml-bench")
  return svc, server, c.model_name


def run_steps(tc, data, steps: int) -> None:
  from tinker import types  # pylint: disable=g-import-not-at-top
  for _ in range(steps):
    fb = tc.forward_backward(data, "cross_entropy")
    op = tc.optim_step(types.AdamParams(learning_rate=1e-3))
    fb.result()
    op.result()


def measure(svc, clients, data, steps: int, concurrent_: bool) -> dict:
  before = svc.trainer.stats()
  config = svc.trainer.config
  if not concurrent_:
    # The baseline is a service that never waits for other clients (else
    # each client switch would pay the wait for the client that stopped).
    svc.trainer.config = dataclasses.replace(config, batch_window_s=0.0)
  t0 = time.perf_counter()
  try:
    if concurrent_:
      with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(lambda tc: run_steps(tc, data, steps), clients))
    else:
      for tc in clients:
        run_steps(tc, data, steps)
  finally:
    svc.trainer.config = config
  wall = time.perf_counter() - t0
  after = svc.trainer.stats()
  d = lambda k: after.get(k, 0) - before.get(k, 0)
  client_steps = len(clients) * steps
  tokens = client_steps * sum(len(x.model_input.to_ints()) for x in data)
  return {"wall_s": wall, "steps_per_s": client_steps / wall,
          "tokens_per_s": tokens / wall,
          "fwdbwd_clients_per_call": d("fwdbwd_ops") / max(1, d(
              "fwdbwd_calls")),
          "optim_clients_per_call": d("optim_ops") / max(1, d("optim_calls"))}


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  ns = [int(x) for x in args.clients.split(",")]
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tinker  # pylint: disable=g-import-not-at-top
  from tinker import types  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as workdir:
    svc, server, base = start_service(args, workdir, max(ns))
    try:
      sc = tinker.ServiceClient()
      all_clients = [sc.create_lora_training_client(base_model=base,
                                                    rank=args.rank)
                     for _ in range(max(ns))]
      vocab = svc.trainer.base.config.vocab_size
      rng = np.random.default_rng(0)
      data = []
      for _ in range(args.rows):
        ids = [int(x) for x in rng.integers(3, vocab, args.tokens + 1)]
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(ids[:-1]),
            loss_fn_inputs={"target_tokens": ids[1:],
                            "weights": [1.0] * args.tokens}))
      rows = []
      for n in ns:
        clients = all_clients[:n]
        for mode in (True, False):  # compile every bucket first
          measure(svc, clients, data, 1, mode)
        conc = measure(svc, clients, data, args.steps, True)
        seq = measure(svc, clients, data, args.steps, False)
        row = {"base": args.base, "clients": n, "steps": args.steps,
               "rows": args.rows, "tokens": args.tokens,
               "concurrent": conc, "sequential": seq,
               "speedup": seq["wall_s"] / conc["wall_s"]}
        rows.append(row)
        print(f"N={n:3d}  concurrent {conc['steps_per_s']:7.2f} steps/s "
              f"{conc['tokens_per_s']:9.0f} tok/s | sequential "
              f"{seq['steps_per_s']:7.2f} steps/s {seq['tokens_per_s']:9.0f} "
              f"tok/s | concurrent/sequential {row['speedup']:.2f}x | "
              f"clients per compiled call: fwd-bwd "
              f"{conc['fwdbwd_clients_per_call']:.2f}, optim "
              f"{conc['optim_clients_per_call']:.2f} (sequential "
              f"{seq['fwdbwd_clients_per_call']:.2f})", flush=True)
    finally:
      server.stop()
      svc.close()
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
