"""Tests of JSONL validation, tokenization and the grain user-mixing pipeline."""

import json

import numpy as np
import pytest

from mintjax.model.tokenizer import byte_tokenizer
from mintjax.train import data
from mintjax.train.cohort import SlotMap, SlotMapError, init_adapter, plan_cohorts
from mintjax.model.sources import RANDOM_VARIANTS

TOK = byte_tokenizer()


def _write(path, lines):
  path.write_text("".join(l + "\n" for l in lines))
  return str(path)


@pytest.mark.parametrize("line,match", [
    ("", "empty line"),
    ("{not json", "malformed JSON"),
    ('{"prompt": "a", "completion": "b"}', "'user'"),
    ('{"user": "u", "prompt": "a"}', "string"),
    ('{"user": "u", "text": "a", "prompt": "b", "completion": "c"}',
     "either"),
    ('{"user": "u", "text": "a", "weight": -1}', "weight"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, match):
  good = json.dumps({"user": "u", "prompt": "p", "completion": "c"})
  path = _write(tmp_path / "d.jsonl", [good, line])
  with pytest.raises(data.DataError, match=match) as e:
    data.read_jsonl(path)
  assert f"{path}:2" in str(e.value)


def test_overflow_truncates_with_warning_or_refuses(caplog):
  rec = {"user": "u", "prompt": "ab", "completion": "x" * 40,
         "_source": "f:1"}
  ex = data.tokenize_record(rec, TOK, max_length=16)
  assert len(ex.tokens) == 17 and "truncating" in caplog.text
  with pytest.raises(data.DataError, match="f:1.*max_length=16"):
    data.tokenize_record(rec, TOK, max_length=16, overflow="error")
  with pytest.raises(data.DataError, match="prompt alone"):
    data.tokenize_record(dict(rec, prompt="p" * 30), TOK, max_length=16)


def test_completion_mask_covers_completion_and_eos_only():
  rec = {"user": "u", "prompt": "Q?", "completion": " A"}
  ex = data.tokenize_record(rec, TOK, 32)
  b = data.Collator({"u": 3}, (16,))([ex])
  n = len(ex.tokens) - 1
  trained = b["targets"][0][b["loss_mask"][0] == 1]
  assert list(trained) == list(ex.tokens[ex.prompt_len:])
  assert trained[-1] == TOK.eos_id and b["adapter_idx"][0] == 3
  assert b["segment_ids"][0, n:].sum() == 0


def _examples(users=("a", "b", "c"), n=4):
  recs = {u: [{"user": u, "prompt": f"q{i}", "completion": f" {u}{i}" * (i + 1)}
              for i in range(n)] for u in users}
  return data.load_examples(recs, TOK, 64)


def test_pipeline_mixes_users_is_deterministic_and_resumable():
  ex = _examples()
  make = lambda: data.make_pipeline(ex, {"a": 1, "b": 2, "c": 3},
                                    global_batch=6, num_steps=8,
                                    buckets=(8, 16, 32, 64), seed=5)
  it = iter(make().to_iter_dataset())
  batches = [next(it) for _ in range(3)]
  assert sorted(set(batches[0]["adapter_idx"])) == [1, 2, 3]
  state = it.get_state()
  rest = [next(it) for _ in range(5)]
  it2 = iter(make().to_iter_dataset())
  it2.set_state(state)
  for a, b in zip(rest, [next(it2) for _ in range(5)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Length buckets: every batch is padded to a bucket.
  assert all(b["tokens"].shape[1] in (8, 16, 32, 64) for b in batches + rest)


def test_user_order_independent_of_cohort_and_process_shards_split_rows():
  ex = _examples(("a", "b", "c", "d"))
  one = data.MixedUserSource(ex, ["a"], seed=1, length=8)
  four = data.MixedUserSource(ex, ["a", "b", "c", "d"], seed=1, length=32)
  assert [one[i].source for i in range(8)] == [four[4 * i].source
                                              for i in range(8)]
  glob = [four[i] for i in range(8)]
  slots = {"a": 1, "b": 2, "c": 3, "d": 4}
  full = data.Collator(slots, (64,))(glob)
  halves = [data.Collator(slots, (64,), 0, p, 2)(glob) for p in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([h["tokens"] for h in halves]), full["tokens"])


def test_unknown_user_in_slot_map_is_refused():
  ex = _examples(("a",))
  with pytest.raises(data.DataError, match="not in the slot map"):
    data.Collator({"b": 1}, (64,))(ex["a"][:2])
  with pytest.raises(SlotMapError, match="unknown user 'z'"):
    SlotMap.for_cohort(["a", "b"], 4).slot("z")
  with pytest.raises(SlotMapError, match="does not fit"):
    SlotMap.for_cohort(["a", "b", "c", "d"], 4)
  assert plan_cohorts(["c", "a", "b", "d", "e"], 2) == [["a", "b"], ["c", "d"],
                                                        ["e"]]


def test_new_adapter_is_peft_style():
  w = init_adapter(RANDOM_VARIANTS["tiny"], ("q", "v"), 4, 8.0, "alice", 0)
  assert np.all(w.lora_b["q"] == 0) and np.abs(w.lora_a["q"]).max() > 0
  assert np.abs(w.lora_a["q"]).max() <= 1 / np.sqrt(64)
  w2 = init_adapter(RANDOM_VARIANTS["tiny"], ("q", "v"), 4, 8.0, "bob", 0)
  assert not np.array_equal(w.lora_a["q"], w2.lora_a["q"])
