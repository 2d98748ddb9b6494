"""Tokenizers: a thin wrapper over Hugging Face `tokenizers`.

Owns `Tokenizer` (encode/decode, special ids, chat template rendering) and
`byte_tokenizer()`, a tiny byte-level tokenizer for tests and random models.
Tokenizers built from GGUF files live in `mintjax.model.gguf`.

Chat templates come from model files, i.e. from strangers: they are rendered
in jinja2's `ImmutableSandboxedEnvironment` (as transformers does), so a
template can read its inputs but cannot reach Python internals (`os`,
`__class__`, ...) or mutate the messages. Templates get the helpers
transformers provides: `raise_exception`, `strftime_now` and a `tojson`
filter that keeps non-ASCII text as is.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from typing import Sequence

import tokenizers

# ChatML, used when a model ships no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@dataclasses.dataclass
class Tokenizer:
  """Text <-> token ids for one base model.

  Attributes:
    backend: the `tokenizers.Tokenizer`.
    eos_id: the primary end-of-sequence id (appended to training
      completions).
    bos_id: optional beginning-of-sequence id prepended by `encode(..., 
      add_bos=True)`.
    pad_id: id used to pad batches.
    chat_template: Jinja chat template (Hugging Face convention).
    extra_eos_ids: further ids that end generation (Hugging Face's
      `generation_config.json` may list several, e.g. Llama-3-Instruct's
      <|end_of_text|>, <|eom_id|> and <|eot_id|>); see `eos_ids`.
  """

  backend: tokenizers.Tokenizer
  eos_id: int
  bos_id: int | None = None
  pad_id: int = 0
  chat_template: str | None = None
  extra_eos_ids: tuple[int, ...] = ()

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every id that ends generation: `eos_id` first, then the extras."""
    return tuple(dict.fromkeys((self.eos_id,) + tuple(self.extra_eos_ids)))

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = self.backend.encode(text, add_special_tokens=False).ids
    if add_bos and self.bos_id is not None:
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    return self.backend.decode(list(ids), skip_special_tokens=skip_special)

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def apply_chat_template(self, messages: Sequence[dict],
                          add_generation_prompt: bool = True) -> str:
    """Renders chat messages ([{'role', 'content'}]) to a prompt string.

    Raises:
      ValueError: a malformed message, or a template that fails or tries to
        leave the sandbox (named in the message).
    """
    import jinja2  # pylint: disable=g-import-not-at-top  # only for chat

    if isinstance(messages, (str, bytes)) or not isinstance(
        messages, Sequence):
      raise ValueError(
          f"chat messages must be a list of {{'role', 'content'}} dicts, got "
          f"{type(messages).__name__}")
    if not messages:
      raise ValueError("chat messages are empty; give at least one message")
    for i, m in enumerate(messages):
      if (not isinstance(m, dict) or not isinstance(m.get("role"), str) or
          not isinstance(m.get("content"), str)):
        raise ValueError(
            f"chat message {i} must be a dict with string 'role' and "
            f"'content', got {m!r:.80}")
    try:
      template = _compiled_template(self.chat_template or CHATML_TEMPLATE)
      return template.render(messages=list(messages),
                             add_generation_prompt=add_generation_prompt,
                             bos_token="", eos_token=self.decode(
                                 [self.eos_id], skip_special=False))
    except jinja2.exceptions.SecurityError as e:
      raise ValueError(
          f"the model's chat template tried an unsafe operation ({e}); it "
          "was stopped by the sandbox. Use a trusted template") from None
    except jinja2.exceptions.TemplateError as e:
      raise ValueError(f"the model's chat template failed: {e}") from None

  # --- persistence (a single JSON file beside a base checkpoint) ----------

  def to_json(self) -> str:
    return json.dumps(dict(
        tokenizer=json.loads(self.backend.to_str()), eos_id=self.eos_id,
        bos_id=self.bos_id, pad_id=self.pad_id,
        chat_template=self.chat_template,
        extra_eos_ids=list(self.extra_eos_ids)))

  @classmethod
  def from_json(cls, text: str) -> "Tokenizer":
    d = json.loads(text)
    return cls(backend=tokenizers.Tokenizer.from_str(
        json.dumps(d["tokenizer"])), eos_id=d["eos_id"], bos_id=d["bos_id"],
               pad_id=d["pad_id"], chat_template=d.get("chat_template"),
               extra_eos_ids=tuple(d.get("extra_eos_ids", ())))


def _raise(message):
  raise ValueError(message)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None,
            sort_keys=False) -> str:
  # jinja2's own tojson escapes HTML characters; chat templates (and
  # transformers) expect plain JSON.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                    separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compiled_template(source: str):
  """The template compiled once in an immutable sandbox (cached per text)."""
  from jinja2 import ext, sandbox  # pylint: disable=g-import-not-at-top

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = _strftime_now
  try:
    return env.from_string(source)
  except Exception as e:  # pylint: disable=broad-except  # any syntax error
    raise ValueError(f"the model's chat template does not parse: {e}"
                     ) from None


def byte_tokenizer() -> Tokenizer:
  """A 259-token byte-level tokenizer: 256 bytes + <pad>, <bos>, <eos>.

  Used by tests and randomly initialised models; any vocab_size >= 259 fits.
  """
  vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
  alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  for ch in sorted(alphabet):
    vocab[ch] = len(vocab)
  model = tokenizers.models.BPE(vocab=vocab, merges=[])
  tok = tokenizers.Tokenizer(model)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False, use_regex=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(["<pad>", "<bos>", "<eos>"])
  return Tokenizer(backend=tok, eos_id=2, bos_id=1, pad_id=0)
