"""Batch serving: JSONL in, JSONL out, through launch/serve.py's library call."""

import json

from configs import serve as serve_config
from mintjax.adapters.spec import AdapterWeights
from mintjax.apps.jsonl_serving import engine_from_config, serve_jsonl
from mintjax.store.registry import Registry
from mintjax.model.sources import load_base_source


def test_serve_jsonl_writes_results_in_order_with_errors_in_place(tmp_path):
  cfg = serve_config.get_config("tiny")
  cfg.registry = str(tmp_path / "reg")
  cfg.input = str(tmp_path / "in.jsonl")
  cfg.output = str(tmp_path / "out.jsonl")
  cfg.engine.max_len = 32
  cfg.engine.max_batch = 4
  cfg.engine.num_slots = 2
  cfg.engine.targets = "q,v"
  cfg.engine.max_rank = 4
  cfg.defaults.max_new_tokens = 4
  base = load_base_source(cfg.base, seed=cfg.base_seed)
  reg = Registry.open(cfg.registry)
  for i in range(3):
    reg.create_adapter(f"u{i}", spec=dict(targets=["q", "v"], rank=4),
                       base_fingerprint=base.fingerprint)
    reg.publish(f"u{i}", AdapterWeights.random(base.config, ("q", "v"), 4,
                                               seed=i), {})
  reqs = [{"prompt": [5, 6, 7], "adapter": f"u{i % 3}", "id": f"r{i}"}
          for i in range(5)]
  lines = [json.dumps(r) for r in reqs]
  lines.insert(2, "{broken")
  lines.append(json.dumps({"prompt": "hi", "adapter": "ghost"}))
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  cfg.pin = "u1"
  summary = serve_jsonl(cfg)
  out = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text()
         .splitlines()]
  assert summary["requests"] == 7 and summary["errors"] == 2
  assert summary["compilations_since_warmup"] == 0
  assert "line 3 is not valid JSON" in out[2]["error"]
  assert "ghost" in out[6]["error"]
  good = [o for o in out if o["error"] is None]
  assert [o["request_id"] for o in good] == [f"r{i}" for i in range(5)]
  assert all(len(o["tokens"]) == 4 or o["finish_reason"] == "stop"
             for o in good)
  engine = engine_from_config(cfg)
  alone = engine.generate([dict(r, max_new_tokens=4) for r in reqs])
  assert [a.tokens for a in alone] == [o["tokens"] for o in good]
