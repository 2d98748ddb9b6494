"""Tinker service batching benchmark: N concurrent clients vs N sequential.

The service runs alone in its own process (tiny random base by default,
`--base smollm2` for the embedded SmolLM2-135M); every client is a separate
process (multiprocessing spawn) with its own official `tinker`
ServiceClient and one LoRA training client, as real users would be. For
each N in --clients, N clients each run --steps steps of `forward_backward`
(--rows datums of --tokens tokens, cross entropy) + `optim_step`:

  concurrent  all N clients at once;
  sequential  the same N clients one after another (each alone on the
              service, which then does not wait for peers: batch_window_s
              is set to 0 for this part).

Reports client-steps/s and trained tokens/s of both, their ratio, and the
batching ratio: how many clients shared each compiled forward-backward and
optim call on average (the service's counters). Every row bucket is
compiled before timing (`Trainer.precompile`), and each pattern runs once
untimed first. Why processes: with clients as threads of the server's
process (the first version of this tool) the SDK's HTTP and protobuf work
competed with the server for one interpreter's GIL, so N=16 concurrent lost
to sequential; real clients are other processes or machines.

Pauses: on a shared machine other people's tools may stop every process
(SIGSTOP) while their own timed run goes. A thread of this process ticks
every 50 ms; a measurement during which a tick came more than 0.5 s late
was paused, and is run again (at most --retries times; the row says how
many tries it took, and `paused` if every try was).

  python -m tools.bench_tinker --clients 1,4,16 --steps 3
  python -m tools.bench_tinker --base smollm2 --clients 1,4,16 --steps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import tempfile
import threading
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
  p.add_argument("--retries", type=int, default=3,
                 help="tries of a measurement that was paused")
  p.add_argument("--json_out", default="")
  return p.parse_args(argv)


class PauseDetector:
  """Ticks every 50 ms; `gap()` is the longest tick delay since `reset()`."""

  def __init__(self):
    self._last = time.monotonic()
    self._gap = 0.0
    threading.Thread(target=self._run, daemon=True).start()

  def _run(self):
    while True:
      time.sleep(0.05)
      now = time.monotonic()
      self._gap = max(self._gap, now - self._last - 0.05)
      self._last = now

  def reset(self):
    self._last, self._gap = time.monotonic(), 0.0

  def gap(self) -> float:
    return self._gap


# --- the server process -------------------------------------------------------

def _server_main(conn, args, workdir: str, max_clients: int) -> None:
  """Builds the service, compiles every bucket, serves; obeys `conn`."""
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
  conn.send((server.port, c.model_name, svc.trainer.base.config.vocab_size))
  config = svc.trainer.config
  while True:
    cmd, value = conn.recv()
    if cmd == "window":
      svc.trainer.config = dataclasses.replace(config, batch_window_s=value)
      conn.send(True)
    elif cmd == "stats":
      conn.send(svc.trainer.stats())
    else:  # stop
      server.stop()
      svc.close()
      conn.send(True)
      return


# --- a client process ---------------------------------------------------------

def _client_main(conn, url: str, base_model: str, args, vocab: int) -> None:
  """One user: its own ServiceClient and training client; runs `steps`
  steps whenever told, answers with its wall time."""
  os.environ["TINKER_BASE_URL"] = url
  os.environ.setdefault("TINKER_API_KEY", "tml-bench")
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tinker  # pylint: disable=g-import-not-at-top
  from tinker import types  # pylint: disable=g-import-not-at-top
  tc = tinker.ServiceClient().create_lora_training_client(
      base_model=base_model, rank=args.rank)
  rng = np.random.default_rng(0)  # every client trains on the same rows
  data = []
  for _ in range(args.rows):
    ids = [int(x) for x in rng.integers(3, vocab, args.tokens + 1)]
    data.append(types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:],
                        "weights": [1.0] * args.tokens}))
  conn.send("ready")
  while True:
    steps = conn.recv()
    if steps is None:
      return
    t0 = time.perf_counter()
    for _ in range(steps):
      fb = tc.forward_backward(data, "cross_entropy")
      op = tc.optim_step(types.AdamParams(learning_rate=1e-3))
      fb.result()
      op.result()
    conn.send(time.perf_counter() - t0)


# --- the measurement ----------------------------------------------------------

def _call(conn, *msg):
  conn.send(msg)
  return conn.recv()


def measure(server, clients, args, steps: int, concurrent_: bool,
            pauses: PauseDetector | None = None) -> dict:
  """Runs `steps` steps on every client (together or one at a time),
  again while a pause of the whole machine spoils the timing."""
  for attempt in range(1, args.retries + 1):
    if pauses is not None:
      pauses.reset()
    out = _measure_once(server, clients, args, steps, concurrent_)
    gap = pauses.gap() if pauses is not None else 0.0
    out.update(tries=attempt, paused=gap > 0.5, max_tick_gap_s=gap)
    if not out["paused"]:
      break
  return out


def _measure_once(server, clients, args, steps: int, concurrent_: bool
                  ) -> dict:
  before = _call(server, "stats", None)
  if not concurrent_:
    # The baseline is a service that never waits for other clients (else
    # each client switch would pay the wait for the client that stopped).
    _call(server, "window", 0.0)
  t0 = time.perf_counter()
  try:
    if concurrent_:
      for c in clients:
        c.send(steps)
      for c in clients:
        c.recv()
    else:
      for c in clients:
        c.send(steps)
        c.recv()
  finally:
    _call(server, "window", args.window_s)
  wall = time.perf_counter() - t0
  after = _call(server, "stats", None)
  d = lambda k: after.get(k, 0) - before.get(k, 0)
  client_steps = len(clients) * steps
  tokens = client_steps * args.rows * args.tokens
  return {"wall_s": wall, "steps_per_s": client_steps / wall,
          "tokens_per_s": tokens / wall,
          "fwdbwd_clients_per_call": d("fwdbwd_ops") / max(1, d(
              "fwdbwd_calls")),
          "optim_clients_per_call": d("optim_ops") / max(1, d("optim_calls")),
          "fwdbwd_s_per_call": d("fwdbwd_seconds") / max(1, d(
              "fwdbwd_calls")),
          "fwdbwd_busy_frac": d("fwdbwd_seconds") / wall,
          "optim_busy_frac": d("optim_seconds") / wall}


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  ns = [int(x) for x in args.clients.split(",")]
  ctx = mp.get_context("spawn")
  rows, procs = [], []
  with tempfile.TemporaryDirectory() as workdir:
    server, child = ctx.Pipe()
    sp = ctx.Process(target=_server_main, args=(child, args, workdir, max(ns)),
                     name="tinker-server")
    sp.start()
    procs.append(sp)
    try:
      port, base_model, vocab = server.recv()
      url = f"http://127.0.0.1:{port}"
      conns = []
      for i in range(max(ns)):
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=_client_main, name=f"tinker-client-{i}",
                        args=(theirs, url, base_model, args, vocab))
        p.start()
        procs.append(p)
        conns.append(mine)
      for c in conns:
        assert c.recv() == "ready"
      pauses = PauseDetector()
      for n in ns:
        clients = conns[:n]
        for mode in (True, False):  # compile every bucket first
          measure(server, clients, args, 1, mode)
        conc = measure(server, clients, args, args.steps, True, pauses)
        seq = measure(server, clients, args, args.steps, False, pauses)
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
              f"{seq['fwdbwd_clients_per_call']:.2f}) | server busy in "
              f"fwd-bwd+optim: concurrent {conc['fwdbwd_busy_frac'] + conc['optim_busy_frac']:.0%}, "
              f"sequential {seq['fwdbwd_busy_frac'] + seq['optim_busy_frac']:.0%}"
              f" | tries {conc['tries']}/{seq['tries']}"
              + (" PAUSED" if conc["paused"] or seq["paused"] else ""),
              flush=True)
      for c in conns:
        c.send(None)
      _call(server, "stop", None)
    finally:
      for p in procs:
        p.join(30)
        if p.is_alive():
          p.terminate()
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
