"""The prompt format an adapter was trained with, recorded and read back.

Owns `PromptFormat` (prompt style 'raw' or 'chat' plus, for 'chat', the
exact chat template text that rendered the training prompts), how training
records it in a revision's provenance (`to_provenance`) and how evaluation
reads it back (`trained_format`).

Why record the template text and not only the style: an adapter trained on
chat-formatted prompts answers in that format only. The base fingerprint
covers config and weights, not the tokenizer, so the same base can come with
another template; evaluating with the recorded text scores exactly the
format the adapter saw (a few hundred bytes per revision).

Provenance keys (written by `mintjax.apps.train_workflow` at publish):
  prompt_format: {'style': 'raw'|'chat', 'chat_template': str | None,
                  'chat_template_sha256': 'sha256:<hex>' | None}
  data_formats: the user's record formats (`data.DATA_FORMATS`), e.g.
                ['chat_messages']; a user trained on chat messages has the
                'chat' style and the template that rendered them.
Revisions published before it existed may still carry
`training_config.prompt_style` (the run's config); that style is used with
the base's own template. Revisions with neither (imported PEFT adapters,
hand-published weights) have an unknown format.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping, Sequence

from mintjax.model.tokenizer import CHATML_TEMPLATE, Tokenizer
from mintjax.train.data import PROMPT_STYLES

# Where a format came from, in the order evaluation tries them.
SOURCES = ("override", "provenance", "training_config", "fallback")


def template_sha256(template: str | None) -> str | None:
  if template is None:
    return None
  return "sha256:" + hashlib.sha256(template.encode("utf-8")).hexdigest()


def effective_template(tokenizer: Tokenizer) -> str:
  """The template `tokenizer.apply_chat_template` renders with."""
  return tokenizer.chat_template or CHATML_TEMPLATE


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How prompts were (or are to be) turned into tokens.

  Attributes:
    style: 'raw' (bos + prompt text) or 'chat' (chat template).
    chat_template: the template text for 'chat'; None means the base
      tokenizer's own template (only for formats whose template was not
      recorded) and is always None for 'raw'.
    source: one of SOURCES: how this format was chosen.
  """

  style: str
  chat_template: str | None = None
  source: str = "provenance"

  def __post_init__(self):
    if self.style not in PROMPT_STYLES:
      raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got "
                       f"{self.style!r}")
    if self.source not in SOURCES:
      raise ValueError(f"prompt format source must be one of {SOURCES}, got "
                       f"{self.source!r}")

  @property
  def template_sha256(self) -> str | None:
    return template_sha256(self.chat_template)

  def key(self) -> tuple:
    """What determines tokenization (source left out)."""
    return (self.style, self.template_sha256)

  def describe(self) -> str:
    """'chat', 'chat sha256:ab12cd34' or 'raw' (short, for tables)."""
    if self.style == "chat" and self.chat_template is not None:
      return f"chat {self.template_sha256[7:15]}"
    return self.style

  def to_provenance(self) -> dict:
    return dict(style=self.style, chat_template=self.chat_template,
                chat_template_sha256=self.template_sha256)

  def tokenizer_for(self, tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` rendering chat prompts with this format's template."""
    if self.style != "chat" or self.chat_template is None:
      return tokenizer
    return dataclasses.replace(tokenizer, chat_template=self.chat_template)


def for_training(tokenizer: Tokenizer, style: str,
                 data_formats: Sequence[str] = ()) -> PromptFormat:
  """The format a user's adapter is trained with.

  Args:
    tokenizer: the base's tokenizer (its template is recorded for 'chat').
    style: the run's prompt style for prompt/completion records.
    data_formats: the `data.DATA_FORMATS` of the user's records; chat
      messages are always rendered with the chat template, so a user with
      any makes the format 'chat' (`data.check_formats` refuses raw prompts
      beside them).
  """
  if "chat_messages" in data_formats:
    style = "chat"
  template = effective_template(tokenizer) if style == "chat" else None
  return PromptFormat(style, template, "provenance")


def trained_format(provenance: Mapping | None) -> PromptFormat | None:
  """The format a revision was trained with, or None when not recorded.

  Raises:
    ValueError: the provenance records a malformed prompt format.
  """
  prov = provenance or {}
  rec = prov.get("prompt_format")
  if rec is not None:
    if not isinstance(rec, Mapping) or rec.get("style") not in PROMPT_STYLES:
      raise ValueError(
          f"provenance prompt_format {rec!r:.120} is malformed (expected "
          f"{{'style': one of {PROMPT_STYLES}, 'chat_template': ...}}); pass "
          "--prompt_style to evaluate this revision")
    template = rec.get("chat_template") if rec["style"] == "chat" else None
    if template is not None and not isinstance(template, str):
      raise ValueError("provenance prompt_format.chat_template must be a "
                       "string; pass --prompt_style to evaluate this revision")
    if template is not None and rec.get("chat_template_sha256") not in (
        None, template_sha256(template)):
      raise ValueError(
          "provenance prompt_format.chat_template does not match its "
          "chat_template_sha256; the record was altered. Pass "
          "--prompt_style to evaluate this revision with the base's template")
    return PromptFormat(rec["style"], template, "provenance")
  cfg = prov.get("training_config")
  if isinstance(cfg, Mapping) and cfg.get("prompt_style") in PROMPT_STYLES:
    return PromptFormat(cfg["prompt_style"], None, "training_config")
  return None


def eval_format(provenance: Mapping | None, override: str | None,
                fallback_style: str = "raw"
                ) -> tuple[PromptFormat, PromptFormat | None, str | None]:
  """The format to evaluate a revision with.

  Args:
    provenance: the revision's provenance.
    override: an explicit prompt style (None: use the trained format). An
      override equal to the trained style keeps the trained template.
    fallback_style: style used when nothing is recorded.

  Returns:
    (format to use, trained format or None, warning or None).
  """
  trained = trained_format(provenance)
  if override is not None:
    if trained is not None and trained.style == override:
      return (dataclasses.replace(trained, source="override"), trained,
              None)
    return PromptFormat(override, None, "override"), trained, None
  if trained is None:
    return (PromptFormat(fallback_style, None, "fallback"), None,
            f"its provenance records no prompt format; evaluating with "
            f"prompt style {fallback_style!r} (pass --prompt_style if it "
            "was trained otherwise)")
  if trained.source == "training_config" and trained.style == "chat":
    return (trained, trained,
            f"its provenance records prompt style {trained.style!r} in its "
            "training config but not the chat template; using the base's")
  return trained, trained, None
