"""Per-user training data: JSONL reading, tokenization and the grain pipeline.

Owns `Example` (one tokenized training example), `read_jsonl` (validated
records with file:line errors), `tokenize_record`, `load_examples`, the data
fingerprint of a user's records, and the deterministic grain pipeline that
mixes users so every batch holds many of them.

Record formats (one JSON object a line; optional positive "weight"):

  prompt_completion  {"user", "prompt", "completion"}: loss on the
                     completion (+ eos); the prompt is rendered raw (bos +
                     text) or with the chat template (`prompt_style`).
  text               {"user", "text"}: loss on every token after bos.
  chat_messages      {"user", "messages": [{"role", "content"}, ...]}
                     (Hugging Face chat format; roles system / user /
                     assistant, the last message the assistant's): rendered
                     with the base's chat template, loss on the assistant
                     turns only.

How assistant spans are found (`chat_example`): the whole conversation is
rendered and tokenized once; for each assistant turn i the conversation up
to turn i (with the generation prompt) and through turn i are rendered and
tokenized too, and the turn's span is the tokens between them. A span
counts only if both are token prefixes of the whole conversation, so no
BPE merge across a turn boundary or template quirk can shift a mask.
Templates that are not prefix-stable (they render an earlier turn
differently once later messages follow, e.g. Qwen3's drops the reasoning
of earlier assistant turns) leave those turns untrained with a warning
naming file:line and turn; the last assistant turn is always stable
(the whole conversation ends with it) unless the template appends text
after it, in which case the record is refused.

  MixedUserSource   random-access stream: element i is user (i mod U)'s
                    next example in that user's own seeded, per-epoch
                    shuffled order (so a user's data order does not depend
                    on which other users share the cohort).
  Collator          a global batch of examples -> this process's rows of a
                    `Batch`, padded to the smallest length bucket that fits
                    the whole global batch (all processes agree on shapes).

`make_pipeline(...).to_iter_dataset()` iterators have `get_state()` /
`set_state()`, which the checkpoint stores. Rows are single examples padded to
a bucket; sequence packing is not implemented.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Mapping, Sequence

import grain
import numpy as np

from mintjax.model.tokenizer import Tokenizer

PROMPT_STYLES = ("raw", "chat")
OVERFLOW = ("truncate", "error")
DATA_FORMATS = ("prompt_completion", "text", "chat_messages")
CHAT_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
  """Training data is malformed or does not fit the configuration."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized training example.

  Attributes:
    user: user id (adapter id).
    tokens: [N] int32 prompt + completion (+ eos) ids.
    prompt_len: number of leading tokens not trained on (for chat
      messages: the tokens before the first trained assistant turn).
    weight: per-example loss weight.
    source: 'file:line' it came from (for error messages).
    loss_mask: None (train every token from prompt_len on) or [N] float32,
      1.0 where token n is trained (predicted from tokens < n); chat
      messages set it to their assistant turns.
  """

  user: str
  tokens: np.ndarray
  prompt_len: int
  weight: float = 1.0
  source: str = ""
  loss_mask: np.ndarray | None = None

  def target_mask(self, width: int) -> np.ndarray:
    """[width] float32: 1.0 where target j (token j + 1) is trained."""
    n = len(self.tokens) - 1
    out = np.zeros((width,), np.float32)
    if self.loss_mask is not None:
      out[:n] = self.loss_mask[1:n + 1]
    else:
      out[max(self.prompt_len - 1, 0):n] = 1.0
    return out


def record_format(rec: Mapping) -> str:
  """The `DATA_FORMATS` entry of a validated record."""
  if "messages" in rec:
    return "chat_messages"
  return "text" if "text" in rec else "prompt_completion"


def _check_messages(messages, where: str) -> None:
  """Refuses a chat record's messages that cannot be trained on."""
  if not isinstance(messages, list) or not messages:
    raise DataError(
        f"{where}: 'messages' must be a non-empty list of {{\"role\", "
        f"\"content\"}} objects, found {type(messages).__name__}")
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise DataError(f"{where}: messages[{i}] must be an object with "
                      f"'role' and 'content', found {type(m).__name__}")
    if m.get("role") not in CHAT_ROLES:
      raise DataError(f"{where}: messages[{i}] has role {m.get('role')!r}; "
                      f"roles are {', '.join(CHAT_ROLES)}")
    if not isinstance(m.get("content"), str):
      raise DataError(
          f"{where}: messages[{i}] 'content' must be a string, found "
          f"{type(m.get('content')).__name__}")
  if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
    raise DataError(
        f"{where}: the last message must be a non-empty 'assistant' reply "
        "(the loss is on assistant turns); end the conversation with one")


def read_jsonl(path: str) -> list[dict]:
  """Reads and validates one JSONL file of training records.

  Each line must be a JSON object with a string "user" and exactly one of:
  string "prompt" and "completion", a string "text", or a "messages" list
  (see the module docstring); an optional positive "weight". Every record
  gets a "_source" of 'path:line'.

  Raises:
    DataError: naming the file and line of the first bad record.
  """
  records = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte {e.start}); save "
                        "the file as UTF-8") from None
      if not line.strip():
        raise DataError(
            f"{where}: empty line; every line of a JSONL file must be one "
            "JSON object (remove blank lines)")
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column "
                        f"{e.colno}); fix or remove this line") from None
      if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, found "
                        f"{type(rec).__name__}")
      if not isinstance(rec.get("user"), str) or not rec["user"]:
        raise DataError(f"{where}: missing or non-string 'user' field")
      has_pc = "prompt" in rec or "completion" in rec
      if has_pc + ("text" in rec) + ("messages" in rec) != 1:
        raise DataError(
            f"{where}: expected either 'prompt' + 'completion', 'text' or "
            f"'messages' (exactly one), found keys {sorted(rec)}")
      if "messages" in rec:
        _check_messages(rec["messages"], where)
      fields = (("prompt", "completion") if has_pc else
                ("text",) if "text" in rec else ())
      for k in fields:
        if not isinstance(rec.get(k), str):
          raise DataError(f"{where}: field {k!r} must be a string, found "
                          f"{type(rec.get(k)).__name__}")
      if has_pc and not rec["completion"]:
        raise DataError(f"{where}: empty 'completion'; nothing to train on")
      w = rec.get("weight", 1.0)
      if not isinstance(w, (int, float)) or not w > 0:
        raise DataError(f"{where}: 'weight' must be a positive number, "
                        f"found {w!r}")
      rec["_source"] = where
      records.append(rec)
  if not records:
    raise DataError(f"{path}: no records; the file is empty")
  return records


def format_prompt(tokenizer: Tokenizer, prompt: str, style: str) -> list[int]:
  """Prompt ids for `style` 'raw' (bos + text) or 'chat' (chat template)."""
  if style == "raw":
    return tokenizer.encode(prompt, add_bos=True)
  if style == "chat":
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return tokenizer.encode(text, add_bos=True)
  raise DataError(f"prompt style must be one of {PROMPT_STYLES}, got "
                  f"{style!r}")


def _render_ids(tokenizer: Tokenizer, messages, add_generation_prompt: bool,
                where: str) -> list[int]:
  """bos + the chat template's rendering of `messages`, tokenized."""
  if not messages:
    return tokenizer.encode("", add_bos=True)
  try:
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt)
  except ValueError as e:
    raise DataError(f"{where}: {e}") from None
  return tokenizer.encode(text, add_bos=True)


def chat_example(messages, tokenizer: Tokenizer, where: str
                 ) -> tuple[list[int], np.ndarray]:
  """A chat conversation's token ids and its assistant-turn loss mask.

  Args:
    messages: validated [{'role', 'content'}] ending with the assistant.
    tokenizer: renders with its chat template.
    where: 'file:line' for messages.

  Returns:
    (ids [N], mask [N] float32: 1.0 on each assistant turn's tokens,
    including the template's end-of-turn marker, excluding its header).

  Raises:
    DataError: the template cannot render the conversation, or no
      assistant turn has a stable span (see the module docstring).
  """
  full = _render_ids(tokenizer, messages, False, where)
  mask = np.zeros((len(full),), np.float32)
  unstable = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    start = _render_ids(tokenizer, messages[:i], True, where)
    end = _render_ids(tokenizer, messages[:i + 1], False, where)
    if (len(start) < len(end) <= len(full) and full[:len(end)] == end and
        end[:len(start)] == start):
      mask[len(start):len(end)] = 1.0
    else:
      unstable.append(i)
  last = len(messages) - 1
  if last in unstable:
    raise DataError(
        f"{where}: the chat template does not render the final assistant "
        "turn as a token prefix of the conversation (it adds text after "
        "it or renders it differently with the generation prompt); use "
        "prompt/completion records for this model")
  if unstable:
    logging.warning(
        "%s: the chat template renders assistant turns %s differently once "
        "later messages follow (not prefix-stable); they are not trained "
        "(split the conversation into one record per turn to train them)",
        where, unstable)
  return full, mask


def tokenize_record(rec: Mapping, tokenizer: Tokenizer, max_length: int,
                    overflow: str = "truncate", prompt_style: str = "raw"
                    ) -> Example:
  """Tokenizes one validated record; the completion ends with eos.

  Chat messages are always rendered with the tokenizer's chat template
  (`prompt_style` applies to prompt/completion records) and end with the
  template's end-of-turn text, not an extra eos.

  `max_length` bounds the model input (tokens - 1). Longer examples are
  truncated at the end with a warning (`overflow='truncate'`) or refused
  (`overflow='error'`); an example whose completion would vanish entirely
  is always refused.

  Raises:
    DataError: naming the record's file and line.
  """
  where = rec.get("_source", "<record>")
  mask = None
  if "messages" in rec:
    ids, mask = chat_example(rec["messages"], tokenizer, where)
    prompt_len = int(np.argmax(mask > 0))
  elif "text" in rec:
    prompt_ids = tokenizer.encode(rec["text"], add_bos=True)
    completion = []
    prompt_len = 1 if prompt_ids else 0  # train on everything after bos
    ids = prompt_ids + [tokenizer.eos_id]
  else:
    prompt_ids = format_prompt(tokenizer, rec["prompt"], prompt_style)
    completion = tokenizer.encode(rec["completion"]) + [tokenizer.eos_id]
    ids = prompt_ids + completion
    prompt_len = len(prompt_ids)
  if len(ids) - 1 > max_length:
    if overflow == "error":
      raise DataError(
          f"{where}: example is {len(ids) - 1} tokens, longer than "
          f"max_length={max_length}; shorten it, raise max_length or set "
          "overflow='truncate'")
    if overflow != "truncate":
      raise DataError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    if prompt_len >= max_length:
      raise DataError(
          f"{where}: the prompt alone is {prompt_len} tokens, so truncating "
          f"to max_length={max_length} leaves no completion to train on")
    logging.warning("%s: truncating example from %d to %d tokens", where,
                    len(ids) - 1, max_length)
    ids = ids[:max_length + 1]
    if mask is not None:
      mask = mask[:max_length + 1]
  if len(ids) < 2:
    raise DataError(f"{where}: example has fewer than 2 tokens")
  return Example(user=rec["user"], tokens=np.asarray(ids, np.int32),
                 prompt_len=prompt_len, weight=float(rec.get("weight", 1.0)),
                 source=where, loss_mask=mask)


def list_data_files(data: str | Sequence[str]) -> list[str]:
  """JSONL files of a directory (sorted) or an explicit list of paths."""
  if isinstance(data, str):
    if os.path.isdir(data):
      files = sorted(os.path.join(data, f) for f in os.listdir(data)
                     if f.endswith(".jsonl"))
      if not files:
        raise DataError(f"no *.jsonl files in data directory {data!r}")
      return files
    data = [data]
  for p in data:
    if not os.path.isfile(p):
      raise DataError(f"data file {p!r} does not exist")
  return list(data)


def read_records(data: str | Sequence[str]) -> dict[str, list[dict]]:
  """All records grouped by user (in file order); validates every file."""
  by_user: dict[str, list[dict]] = {}
  for path in list_data_files(data):
    for rec in read_jsonl(path):
      by_user.setdefault(rec["user"], []).append(rec)
  return by_user


def data_formats(records: Sequence[Mapping]) -> tuple[str, ...]:
  """The `DATA_FORMATS` a user's records use (sorted)."""
  return tuple(sorted({record_format(r) for r in records}))


def check_formats(records_by_user: Mapping[str, Sequence[Mapping]],
                  prompt_style: str) -> None:
  """Refuses a user whose records mix chat messages with raw prompts.

  An adapter records one prompt format (evaluation renders its held-out
  prompts that way): chat messages use the chat template, so that user's
  prompt/completion records must too.

  Raises:
    DataError: naming the first raw prompt record and the fix.
  """
  if prompt_style == "chat":
    return
  for user, recs in records_by_user.items():
    if "chat_messages" not in data_formats(recs):
      continue
    raw = next((r for r in recs
                if record_format(r) == "prompt_completion"), None)
    if raw is not None:
      raise DataError(
          f"{raw.get('_source', user)}: user {user!r} has chat 'messages' "
          "records and prompt/completion records rendered raw; set "
          "prompt_style='chat' (--config.prompt_style=chat) so all of its "
          "prompts use the chat template, or convert them to messages")


def load_examples(records_by_user: Mapping[str, Sequence[Mapping]],
                  tokenizer: Tokenizer, max_length: int,
                  overflow: str = "truncate", prompt_style: str = "raw"
                  ) -> dict[str, list[Example]]:
  """Tokenizes every user's records (all of them before returning).

  Raises:
    DataError: a bad record (file:line) or a user mixing chat messages
      with raw prompts (`check_formats`).
  """
  check_formats(records_by_user, prompt_style)
  return {u: [tokenize_record(r, tokenizer, max_length, overflow,
                              prompt_style) for r in recs]
          for u, recs in records_by_user.items()}


def data_fingerprint(records: Sequence[Mapping]) -> str:
  """sha256 over a user's records (canonical JSON, source location left out)."""
  h = hashlib.sha256()
  for r in records:
    clean = {k: v for k, v in r.items() if not k.startswith("_")}
    h.update(json.dumps(clean, sort_keys=True).encode())
    h.update(b"\n")
  return "sha256:" + h.hexdigest()


def _user_seed(seed: int, user: str) -> int:
  digest = hashlib.sha256(f"{seed}:{user}".encode()).digest()
  return int.from_bytes(digest[:8], "little")


class MixedUserSource:
  """Random-access mixture of users: element i belongs to user i mod U.

  Each user's examples repeat in epochs, each epoch a fresh permutation
  seeded by (seed, user, epoch), so the order a user sees is fixed by the
  seed and that user alone.
  """

  def __init__(self, examples_by_user: Mapping[str, Sequence[Example]],
               users: Sequence[str], seed: int, length: int):
    missing = [u for u in users if not examples_by_user.get(u)]
    if missing:
      raise DataError(f"users {missing} have no training examples")
    self._examples = {u: list(examples_by_user[u]) for u in users}
    self._users = list(users)
    self._seed = seed
    self._length = length
    self._perms: dict[tuple[str, int], np.ndarray] = {}

  def __len__(self) -> int:
    return self._length

  def _perm(self, user: str, epoch: int) -> np.ndarray:
    key = (user, epoch)
    if key not in self._perms:
      rng = np.random.default_rng([_user_seed(self._seed, user), epoch])
      self._perms[key] = rng.permutation(len(self._examples[user]))
    return self._perms[key]

  def __getitem__(self, i: int) -> Example:
    user = self._users[i % len(self._users)]
    k = i // len(self._users)
    n = len(self._examples[user])
    return self._examples[user][int(self._perm(user, k // n)[k % n])]


@dataclasses.dataclass(frozen=True)
class Collator:
  """Turns a global batch of examples into this process's rows (numpy).

  Attributes:
    slot_of_user: user -> bank slot.
    buckets: ascending padded lengths; the batch uses the smallest bucket
      that fits its longest example.
    pad_id: padding token id.
    process_index: this process.
    process_count: number of processes sharing the global batch.
    vocab_size: when given, every token id must be in [0, vocab_size).
    num_slots: when given, every user's slot must be in [1, num_slots).
      Inside the compiled step out-of-range values are not errors (a
      gather clamps them: another user's slot would be trained), so they
      are refused here, where the batch is built.
  """

  slot_of_user: Mapping[str, int]
  buckets: tuple[int, ...]
  pad_id: int = 0
  process_index: int = 0
  process_count: int = 1
  vocab_size: int | None = None
  num_slots: int | None = None

  def __post_init__(self):
    if self.num_slots is not None:
      bad = {u: s for u, s in self.slot_of_user.items()
             if isinstance(s, bool) or not isinstance(s, (int, np.integer))
             or not 1 <= s < self.num_slots}
      if bad:
        raise DataError(
            f"slots {bad} are outside [1, {self.num_slots}) (slot 0 is the "
            "null adapter); assign each user its own slot of the bank")

  def bucket_for(self, length: int) -> int:
    for b in self.buckets:
      if length <= b:
        return b
    raise DataError(
        f"an example of {length} tokens exceeds the largest length bucket "
        f"{self.buckets[-1]}; raise the buckets or lower max_length")

  def __call__(self, examples: Sequence[Example]) -> dict:
    global_b = len(examples)
    if global_b % self.process_count:
      raise DataError(f"global batch {global_b} is not divisible by "
                      f"{self.process_count} processes")
    t = self.bucket_for(max(len(e.tokens) - 1 for e in examples))
    per = global_b // self.process_count
    local = examples[self.process_index * per:(self.process_index + 1) * per]
    tokens = np.full((per, t), self.pad_id, np.int32)
    targets = np.full((per, t), self.pad_id, np.int32)
    mask = np.zeros((per, t), np.float32)
    segs = np.zeros((per, t), np.int32)
    pos = np.zeros((per, t), np.int32)
    idx = np.zeros((per,), np.int32)
    weight = np.zeros((per,), np.float32)
    for r, e in enumerate(local):
      if e.user not in self.slot_of_user:
        raise DataError(
            f"user {e.user!r} ({e.source}) is not in the slot map "
            f"{sorted(self.slot_of_user)}; load the user into a slot first")
      if self.vocab_size is not None and len(e.tokens) and (
          e.tokens.min() < 0 or e.tokens.max() >= self.vocab_size):
        raise DataError(
            f"{e.source}: token ids outside the model's vocabulary "
            f"[0, {self.vocab_size}); use the base model's own tokenizer")
      n = len(e.tokens) - 1
      tokens[r, :n] = e.tokens[:-1]
      targets[r, :n] = e.tokens[1:]
      # Target j predicts token j + 1: trained when it is a completion token.
      mask[r] = e.target_mask(t)
      segs[r, :n] = 1
      pos[r] = np.arange(t)
      idx[r] = self.slot_of_user[e.user]
      weight[r] = e.weight
    return dict(tokens=tokens, targets=targets, loss_mask=mask,
                positions=pos, segment_ids=segs, adapter_idx=idx,
                weight=weight)


def make_pipeline(examples_by_user: Mapping[str, Sequence[Example]],
                  slot_of_user: Mapping[str, int], *, global_batch: int,
                  num_steps: int, buckets: Sequence[int], seed: int,
                  pad_id: int = 0, process_index: int = 0,
                  process_count: int = 1, vocab_size: int | None = None,
                  num_slots: int | None = None) -> grain.MapDataset:
  """A deterministic grain dataset of `num_steps` batches for one cohort.

  Element i is a dict of this process's rows of global batch i (see
  `Collator`); `.to_iter_dataset()` gives a checkpointable iterator.
  `vocab_size` / `num_slots` turn on the Collator's range checks.
  """
  users = list(slot_of_user)
  source = MixedUserSource(examples_by_user, users, seed,
                           num_steps * global_batch)
  collate = Collator(dict(slot_of_user), tuple(sorted(buckets)), pad_id,
                     process_index, process_count, vocab_size=vocab_size,
                     num_slots=num_slots)
  return grain.MapDataset.source(source).batch(
      global_batch, drop_remainder=True, batch_fn=collate)
