"""What a serving request and its result are, and how JSON turns into them.

Owns `RequestError`, `GenerationRequest` (with `from_dict`, which checks
every JSON field's type before anything reaches the device),
`GenerationResult` and `TokenEvent`. The engine (`mintjax.serve.engine`)
consumes them; the JSONL and HTTP applications build them from their wire
formats.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mintjax.serve.sampling import SamplingError, SamplingParams


class RequestError(ValueError):
  """A request is malformed (prompt, adapter ref or sampling parameters)."""


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
  """One generation request.

  Exactly one of `prompt` (text or token ids) and `messages` (chat
  messages rendered with the tokenizer's chat template) is given.
  """

  prompt: str | tuple[int, ...] | None = None
  adapter: str | None = None
  sampling: SamplingParams = SamplingParams()
  messages: tuple[Mapping[str, str], ...] | None = None
  request_id: str | None = None
  add_bos: bool = False

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "GenerationRequest":
    """From a JSON-style dict; sampling keys may sit at the top level.

    Raises:
      RequestError / SamplingError: naming the bad field and the fix.
    """
    d = dict(d)
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    samp = d.pop("sampling", None) or {}
    if not isinstance(samp, Mapping):
      raise RequestError(
          f"'sampling' must be an object of sampling parameters, got "
          f"{type(samp).__name__}")
    samp = dict(samp)
    samp.update({k: d.pop(k) for k in list(d) if k in fields})
    _check_sampling_types(samp)
    known = {"prompt", "adapter", "messages", "request_id", "id", "add_bos"}
    unknown = set(d) - known
    if unknown:
      raise RequestError(f"unknown request fields {sorted(unknown)}; known: "
                         f"{sorted(known | fields | {'sampling'})}")
    prompt = d.get("prompt")
    if isinstance(prompt, list):
      prompt = tuple(prompt)
    if prompt is not None and not isinstance(prompt, (str, tuple)):
      raise RequestError(
          f"'prompt' must be text or a list of token ids, got "
          f"{type(prompt).__name__}")
    messages = d.get("messages")
    if messages is not None and not isinstance(messages, (list, tuple)):
      raise RequestError(
          f"'messages' must be a list of {{'role', 'content'}} objects, got "
          f"{type(messages).__name__}")
    adapter = d.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
      raise RequestError(
          f"'adapter' must be a ref string such as 'alice:prod' or null for "
          f"the base, got {type(adapter).__name__}")
    add_bos = d.get("add_bos", False)
    if not isinstance(add_bos, bool):
      raise RequestError(f"'add_bos' must be true or false, got {add_bos!r}")
    return cls(prompt=prompt, adapter=adapter,
               sampling=SamplingParams.from_dict(samp),
               messages=tuple(messages) if messages is not None else None,
               request_id=d.get("request_id", d.get("id")),
               add_bos=add_bos)


# Sampling values travel to the device as int32; larger ones cannot.
_INT32_MAX = 2**31 - 1


def _check_sampling_types(samp: Mapping[str, Any]) -> None:
  """Refuses JSON values SamplingParams would misread (bools as ints,
  numbers as stop strings, ints that overflow the int32 device rows)."""
  for k in ("max_new_tokens", "top_k", "seed"):
    v = samp.get(k)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
      raise SamplingError(f"{k} must be an integer, got {v!r}")
    if isinstance(v, int) and v > _INT32_MAX:
      raise SamplingError(
          f"{k}={v} is too large; it must be at most {_INT32_MAX}")
  for k in ("temperature", "top_p"):
    v = samp.get(k)
    if v is not None and (isinstance(v, bool) or
                          not isinstance(v, (int, float))):
      raise SamplingError(f"{k} must be a number, got {v!r}")
  stop = samp.get("stop")
  if stop is not None and not isinstance(stop, str) and (
      not isinstance(stop, (list, tuple)) or
      not all(isinstance(x, str) for x in stop)):
    raise SamplingError(
        f"stop must be a string or a list of strings, got {stop!r:.60}")
  ids = samp.get("stop_token_ids")
  if ids is not None and (not isinstance(ids, (list, tuple)) or any(
      isinstance(t, bool) or not isinstance(t, int) for t in ids)):
    raise SamplingError(
        f"stop_token_ids must be a list of integer token ids, got "
        f"{ids!r:.60}")
  if "ignore_eos" in samp and not isinstance(samp["ignore_eos"], bool):
    raise SamplingError(
        f"ignore_eos must be true or false, got {samp['ignore_eos']!r}")


@dataclasses.dataclass
class GenerationResult:
  """What one request produced.

  Attributes:
    request_id: the request's id (its index when none was given).
    tokens: generated token ids (including a final stop token).
    text: decoded text, cut before the first stop string.
    logprobs: per generated token, its log-probability under the model.
    finish_reason: 'stop', 'length', 'max_len', 'error' or 'cancelled'
      (`Engine.cancel`; `error` then says why).
    adapter: the ref as requested (None = base).
    revision: the resolved 'id@revision' (None = base).
    prompt_tokens: prompt length.
    error: message when finish_reason == 'error'.
    top_logprobs: with `SamplingParams.top_logprobs=n`, per generated token
      its n most likely tokens as [(token id, logprob), ...], best first
      (None when not asked).
    prompt_logprobs: with `SamplingParams.prompt_logprobs`, per prompt token
      its log-probability given the tokens before it; the first is None
      (nothing precedes it).
    prompt_top_logprobs: with `prompt_logprobs=n > 0`, per prompt position
      the n most likely tokens as for `top_logprobs` (first entry None).
  """

  request_id: str
  tokens: list[int]
  text: str
  logprobs: list[float]
  finish_reason: str
  adapter: str | None
  revision: str | None
  prompt_tokens: int
  error: str | None = None
  top_logprobs: list[list[tuple[int, float]]] | None = None
  prompt_logprobs: list[float | None] | None = None
  prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class TokenEvent:
  """A streamed token (or a finished request when `result` is set).

  `top_logprobs` holds the token's most likely alternatives when the
  request asked for them (as in `GenerationResult.top_logprobs`).
  """

  request_id: str
  index: int
  token: int | None
  logprob: float | None
  result: GenerationResult | None = None
  top_logprobs: list[tuple[int, float]] | None = None
