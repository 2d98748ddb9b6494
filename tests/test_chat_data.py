"""Chat-format training data: {"user", "messages": [...]} records.

Rendered with the chat template, loss on the assistant turns only (found by
token-prefix consistency), file:line errors, one prompt format per user,
and the format recorded for evaluation.
"""

import dataclasses
import json
import logging

import numpy as np
import pytest

from mintjax.eval import prompt_format as pf
from mintjax.model.tokenizer import CHATML_TEMPLATE, byte_tokenizer
from mintjax.train import data

CONVO = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Name?"},
         {"role": "assistant", "content": "Mint."}]

# Renders every assistant turn but the last as a placeholder: the earlier
# turn's text changes once later messages follow (not prefix-stable).
DROPS_EARLIER = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and not "
    "loop.last %}<A>...</A>{% elif m['role'] == 'assistant' %}<A>"
    "{{ m['content'] }}</A>{% else %}<U>{{ m['content'] }}</U>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<A>{% endif %}")
# The generation prompt opens a turn the conversation never renders.
BAD_HEADER = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}")


def _write(tmp_path, records, name="d.jsonl"):
  path = tmp_path / name
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _trained_text(tok, ex):
  """The text of each maximal run of trained tokens."""
  runs, cur = [], []
  for t, m in zip(ex.tokens.tolist(), ex.loss_mask.tolist()):
    if m:
      cur.append(t)
    elif cur:
      runs.append(tok.decode(cur)), cur.clear()
  if cur:
    runs.append(tok.decode(cur))
  return runs


def test_loss_is_on_the_assistant_turns_only(tmp_path):
  tok = byte_tokenizer()
  recs = data.read_jsonl(_write(tmp_path, [{"user": "a", "messages": CONVO}]))
  ex = data.tokenize_record(recs[0], tok, 512)
  full = tok.apply_chat_template(CONVO, add_generation_prompt=False)
  assert tok.decode(ex.tokens.tolist()) == full
  # ChatML: each turn's header is prompt, its text and end marker trained.
  assert _trained_text(tok, ex) == ["Hello!<|im_end|>\n", "Mint.<|im_end|>\n"]
  assert ex.prompt_len == int(np.flatnonzero(ex.loss_mask)[0])
  # The collator trains exactly those targets (target j = token j + 1).
  batch = data.Collator({"a": 1}, (512,))([ex])
  n = len(ex.tokens) - 1
  np.testing.assert_array_equal(batch["loss_mask"][0, :n], ex.loss_mask[1:])
  assert batch["loss_mask"][0, n:].sum() == 0


def test_turns_a_template_renders_unstably_are_left_out(tmp_path, caplog):
  tok = dataclasses.replace(byte_tokenizer(), chat_template=DROPS_EARLIER)
  recs = data.read_jsonl(_write(tmp_path, [{"user": "a", "messages": CONVO}]))
  with caplog.at_level(logging.WARNING):
    ex = data.tokenize_record(recs[0], tok, 512)
  assert _trained_text(tok, ex) == ["Mint.</A>"]
  assert "d.jsonl:1" in caplog.text and "not prefix-stable" in caplog.text


def test_a_final_turn_without_a_stable_span_is_refused(tmp_path):
  tok = dataclasses.replace(byte_tokenizer(), chat_template=BAD_HEADER)
  recs = data.read_jsonl(_write(tmp_path, [{"user": "a", "messages": CONVO}]))
  with pytest.raises(data.DataError, match=r"d\.jsonl:1: the chat template"):
    data.tokenize_record(recs[0], tok, 512)


def test_truncation_keeps_mask_and_tokens_aligned(tmp_path):
  tok = byte_tokenizer()
  recs = data.read_jsonl(_write(tmp_path, [{"user": "a", "messages": CONVO}]))
  full = data.tokenize_record(recs[0], tok, 512)
  cut = data.tokenize_record(recs[0], tok, len(full.tokens) - 5)
  assert len(cut.loss_mask) == len(cut.tokens) == len(full.tokens) - 4
  np.testing.assert_array_equal(cut.loss_mask, full.loss_mask[:len(cut.tokens)])


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    ([{"role": "bot", "content": "x"}], r"messages\[0\] has role 'bot'"),
    ([{"role": "user", "content": 3}], r"messages\[0\] 'content' must be"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
     "last message must be a non-empty 'assistant'"),
])
def test_bad_messages_name_file_and_line(tmp_path, messages, match):
  path = _write(tmp_path, [{"user": "a", "messages": CONVO},
                           {"user": "a", "messages": messages}])
  with pytest.raises(data.DataError, match=r"d\.jsonl:2: .*" + match):
    data.read_jsonl(path)


def test_messages_beside_other_fields_are_refused(tmp_path):
  path = _write(tmp_path, [{"user": "a", "messages": CONVO, "text": "x"}])
  with pytest.raises(data.DataError,
                     match=r"d\.jsonl:1: expected either.*exactly one"):
    data.read_jsonl(path)


def test_a_user_mixing_chat_and_raw_prompts_is_refused(tmp_path):
  tok = byte_tokenizer()
  path = _write(tmp_path, [{"user": "a", "messages": CONVO},
                           {"user": "a", "prompt": "p", "completion": "c"},
                           {"user": "b", "prompt": "p", "completion": "c"}])
  recs = data.read_records(path)
  with pytest.raises(data.DataError, match=r"d\.jsonl:2: user 'a'.*"
                     "prompt_style='chat'"):
    data.load_examples(recs, tok, 512, prompt_style="raw")
  out = data.load_examples(recs, tok, 512, prompt_style="chat")
  assert [e.loss_mask is None for e in out["a"]] == [False, True]


def test_chat_trained_adapters_record_the_template_for_evaluation():
  tok = byte_tokenizer()
  fmt = pf.for_training(tok, "raw", ("chat_messages",))
  assert fmt.style == "chat" and fmt.chat_template == CHATML_TEMPLATE
  prov = {"prompt_format": fmt.to_provenance(),
          "data_formats": ["chat_messages"]}
  used, trained, warning = pf.eval_format(prov, None)
  assert used.style == "chat" and used.chat_template == CHATML_TEMPLATE
  assert warning is None and trained == used
  assert pf.for_training(tok, "raw", ("prompt_completion",)).style == "raw"
