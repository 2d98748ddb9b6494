"""OpenAI request/response shapes for completions and chat completions.

Owns the request models (pydantic, unknown fields refused as OpenAI does),
`OpenAIError` (an HTTP status plus OpenAI's error JSON), the translation of
a request into engine `GenerationRequest`s (one per choice, `n`), response
and stream-chunk builders, and `TextDeltas` (streamed text that never shows
a partial stop string or a half-decoded UTF-8 character).

Supported: prompt (text or token ids), messages (text content), max_tokens /
max_completion_tokens, temperature, top_p, seed, stop, n, stream (+
stream_options.include_usage), logprobs of the chosen tokens with up to 20
top alternatives (chat `logprobs` + `top_logprobs`, completions
`logprobs=n`), echo (completions; with `logprobs` the prompt tokens'
log-probabilities too, the first null, when not streaming), usage; extras
top_k, ignore_eos, stop_token_ids, return_tokens_as_token_ids (vLLM's name).
Ignored: user, metadata, store, service_tier, parallel_tool_calls.
Refused with 400: chat top_logprobs without logprobs=true, best_of != n,
penalties != 0, logit_bias, suffix, tools/functions, non-text
response_format, echo with logprobs when streaming, several prompts in one
request.
"""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any, Literal, Sequence

import pydantic

from mintjax.serve.engine import GenerationRequest, GenerationResult
from mintjax.serve.sampling import SamplingError, SamplingParams


class OpenAIError(Exception):
  """An error response: status plus OpenAI's {"error": {...}} body."""

  def __init__(self, status: int, message: str, *,
               type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: dict | None = None):
    super().__init__(message)
    self.status, self.message = status, message
    self.type, self.param, self.code = type_, param, code
    self.headers = headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type,
                      "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
  return OpenAIError(400, message, param=param)


class _Base(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid")

  model: str
  max_tokens: int | None = pydantic.Field(default=None, ge=1)
  temperature: float | None = pydantic.Field(default=None, ge=0.0)
  top_p: float | None = pydantic.Field(default=None, gt=0.0, le=1.0)
  n: int = pydantic.Field(default=1, ge=1, le=16)
  stream: bool = False
  stream_options: dict[str, Any] | None = None
  stop: str | list[str] | None = None
  seed: int | None = None
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  logit_bias: dict[str, float] | None = None
  user: str | None = None
  # mintjax extras (OpenAI SDK: extra_body={...}).
  top_k: int | None = pydantic.Field(default=None, ge=0)
  ignore_eos: bool = False
  stop_token_ids: list[int] | None = None
  # vLLM's name: logprobs name tokens 'token_id:<id>' instead of their text.
  return_tokens_as_token_ids: bool = False


class CompletionRequest(_Base):
  prompt: str | list[int] | list[str] | list[list[int]]
  logprobs: int | None = pydantic.Field(default=None, ge=0, le=20)
  echo: bool = False
  best_of: int | None = None
  suffix: str | None = None


class ChatMessage(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="allow")
  role: Literal["system", "user", "assistant", "developer", "tool"]
  content: str | list[dict[str, Any]] | None = None

  def text(self) -> str:
    if self.content is None or isinstance(self.content, str):
      return self.content or ""
    parts = []
    for p in self.content:
      if p.get("type") != "text":
        raise bad_request(f"message content parts of type {p.get('type')!r} "
                          "are not supported; send text parts only",
                          "messages")
      parts.append(str(p.get("text", "")))
    return "".join(parts)


class ChatCompletionRequest(_Base):
  messages: list[ChatMessage] = pydantic.Field(min_length=1)
  max_completion_tokens: int | None = pydantic.Field(default=None, ge=1)
  logprobs: bool = False
  top_logprobs: int | None = pydantic.Field(default=None, ge=0, le=20)
  tools: list[Any] | None = None
  tool_choice: Any = None
  functions: list[Any] | None = None
  response_format: dict[str, Any] | None = None
  # Accepted and ignored (no effect on generation).
  metadata: dict[str, Any] | None = None
  store: bool | None = None
  service_tier: str | None = None
  parallel_tool_calls: bool | None = None


def parse(model_cls, body: Any):
  """Validates a JSON body; the first problem becomes a one-line 400."""
  if not isinstance(body, dict):
    raise bad_request("the request body must be a JSON object")
  try:
    return model_cls.model_validate(body)
  except pydantic.ValidationError as e:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
      raise bad_request(f"unrecognized request argument supplied: {loc}",
                        loc) from None
    raise bad_request(f"{loc}: {err['msg']} (got {err.get('input')!r:.60})",
                      loc) from None


def _refuse_unsupported(req: _Base) -> None:
  if req.presence_penalty or req.frequency_penalty:
    raise bad_request("presence_penalty and frequency_penalty are not "
                      "supported; omit them or pass 0", "presence_penalty")
  if req.logit_bias:
    raise bad_request("logit_bias is not supported; omit it", "logit_bias")
  if req.stream_options and not req.stream:
    raise bad_request("stream_options needs stream=true", "stream_options")
  if isinstance(req, CompletionRequest):
    if req.echo and req.logprobs is not None and req.stream:
      raise bad_request("echo with logprobs (prompt logprobs) is supported "
                        "without streaming only; drop stream, echo or "
                        "logprobs", "echo")
    if req.best_of is not None and req.best_of != req.n:
      raise bad_request("best_of is not supported; omit it or set it to n",
                        "best_of")
    if req.suffix:
      raise bad_request("suffix is not supported; omit it", "suffix")
  else:
    if req.top_logprobs and not req.logprobs:
      raise bad_request(
          f"top_logprobs={req.top_logprobs} needs logprobs=true (as in "
          "OpenAI's API)", "top_logprobs")
    if req.tools or req.functions or req.tool_choice not in (None, "none"):
      raise bad_request("tools and function calling are not supported",
                        "tools")
    if req.response_format and req.response_format.get("type") != "text":
      raise bad_request("only response_format {'type': 'text'} is "
                        "supported", "response_format")


def prompt_of(req: CompletionRequest) -> str | tuple[int, ...]:
  p = req.prompt
  if isinstance(p, list) and p and isinstance(p[0], (str, list)):
    if len(p) != 1:
      raise bad_request(
          f"{len(p)} prompts in one request are not supported; send one "
          "request per prompt (they share the batch anyway)", "prompt")
    p = p[0]
  if isinstance(p, list):
    if not p:
      raise bad_request("prompt is empty; give text or token ids", "prompt")
    return tuple(p)
  return p


def to_generation_requests(req: _Base, *, adapter: str | None,
                           default_max_tokens: int, request_id: str
                           ) -> list[GenerationRequest]:
  """One engine request per choice; seeds differ per choice (seed + i)."""
  _refuse_unsupported(req)
  max_tokens = req.max_tokens
  if isinstance(req, ChatCompletionRequest):
    max_tokens = req.max_completion_tokens or max_tokens
    messages = tuple({"role": m.role, "content": m.text()}
                     for m in req.messages)
    prompt = None
  else:
    messages, prompt = None, prompt_of(req)
  temperature = 1.0 if req.temperature is None else req.temperature
  stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
  seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
  if isinstance(req, ChatCompletionRequest):
    top, prompt_lp = (req.top_logprobs or 0) if req.logprobs else 0, None
  else:
    top = req.logprobs or 0
    prompt_lp = req.logprobs if req.echo and req.logprobs is not None else None
  out = []
  for i in range(req.n):
    try:
      sampling = SamplingParams(
          max_new_tokens=max_tokens or default_max_tokens,
          temperature=float(temperature),
          top_p=1.0 if req.top_p is None else float(req.top_p),
          top_k=req.top_k or 0, seed=(seed + i) % 2**31, stop=tuple(stop),
          stop_token_ids=tuple(req.stop_token_ids or ()),
          ignore_eos=req.ignore_eos, top_logprobs=top,
          prompt_logprobs=prompt_lp)
    except SamplingError as e:
      raise bad_request(str(e)) from None
    out.append(GenerationRequest(prompt=prompt, messages=messages,
                                 adapter=adapter, sampling=sampling,
                                 request_id=f"{request_id}-{i}"))
  return out


def new_id(kind: str) -> str:
  return f"{kind}-{uuid.uuid4().hex[:24]}"


FINISH = {"stop": "stop", "length": "length", "max_len": "length"}


def finish_reason(result: GenerationResult) -> str:
  return FINISH.get(result.finish_reason, result.finish_reason)


def usage(results: Sequence[GenerationResult]) -> dict:
  prompt = results[0].prompt_tokens if results else 0
  completion = sum(len(r.tokens) for r in results)
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": prompt + completion}


def token_texts(tokenizer, tokens: Sequence[int], as_ids: bool) -> list[str]:
  if as_ids or tokenizer is None:
    return [f"token_id:{t}" for t in tokens]
  return [tokenizer.decode([t]) for t in tokens]


def completion_logprobs(tokenizer, tokens: Sequence[int],
                        logprobs: Sequence[float | None], offset: int,
                        as_ids: bool = False, top=None) -> dict:
  """The legacy completions `logprobs` object.

  Args:
    tokens / logprobs: the tokens and their log-probabilities (None for an
      echoed prompt's first token).
    offset: text offset of the first token.
    as_ids: name tokens 'token_id:<id>'.
    top: None, or per token its [(token id, logprob), ...] alternatives
      (`GenerationResult.top_logprobs`; None entries stay null).
  """
  texts = token_texts(tokenizer, tokens, as_ids)
  offsets, pos = [], offset
  for t in texts:
    offsets.append(pos)
    pos += len(t)
  tops = None
  if top is not None:
    tops = [None if alts is None else {
        s: float(lp) for s, (_, lp) in zip(
            token_texts(tokenizer, [i for i, _ in alts], as_ids), alts)}
            for alts in top]
  return {"tokens": texts,
          "token_logprobs": [None if x is None else float(x)
                             for x in logprobs],
          "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, tokens: Sequence[int],
                  logprobs: Sequence[float], as_ids: bool = False,
                  top=None) -> dict:
  """The chat `logprobs` object; `top` as for `completion_logprobs`."""
  content = []
  for j, (s, lp) in enumerate(zip(token_texts(tokenizer, tokens, as_ids),
                                  logprobs)):
    alts = []
    if top is not None:
      ids = [i for i, _ in top[j]]
      alts = [{"token": a, "logprob": float(x), "bytes": list(a.encode())}
              for a, (_, x) in zip(token_texts(tokenizer, ids, as_ids),
                                   top[j])]
    content.append({"token": s, "logprob": float(lp),
                    "bytes": list(s.encode()), "top_logprobs": alts})
  return {"content": content, "refusal": None}


def envelope(kind: str, rid: str, model: str, choices: list,
             revision: str | None, usage_: dict | None = None) -> dict:
  body = {"id": rid, "object": kind, "created": int(time.time()),
          "model": model, "choices": choices,
          # Not an OpenAI field (clients ignore it): the revision served.
          "adapter_revision": revision}
  if usage_ is not None:
    body["usage"] = usage_
  return body


class TextDeltas:
  """Streamed text of one choice: `add` returns only what is final.

  Text that could still turn into a stop string is held back (the engine
  cuts the output before the stop string), as is a trailing partial UTF-8
  character; `finish` returns the rest of the engine's final text, so the
  concatenated deltas equal the non-streamed text exactly.
  """

  def __init__(self, tokenizer, stop: Sequence[str], prefix: str = ""):
    self.tokenizer = tokenizer
    self.stop = tuple(stop)
    self.tokens: list[int] = []
    self.prefix = prefix
    self.sent = 0  # characters of the generated text already sent

  def add(self, tokens: Sequence[int]) -> str:
    self.tokens += tokens
    if self.tokenizer is None:
      return ""
    text = self.tokenizer.decode(self.tokens)
    safe = len(text.rstrip("\ufffd"))
    for s in self.stop:
      for k in range(min(len(s) - 1, len(text)), 0, -1):
        if text.endswith(s[:k]):
          safe = min(safe, len(text) - k)
          break
    return self._take(text, safe)

  def finish(self, final_text: str) -> str:
    return self._take(final_text, len(final_text))

  def _take(self, text: str, upto: int) -> str:
    delta = ""
    if self.prefix:
      delta, self.prefix = self.prefix, ""
    if upto > self.sent:
      delta += text[self.sent:upto]
      self.sent = upto
    return delta
