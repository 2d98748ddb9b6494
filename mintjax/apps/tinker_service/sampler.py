"""The sampling side of the Tinker service: sessions, samples and scoring.

Owns `SamplingSession` (a sampling client: a base model, or one saved
sampler revision pinned at creation, so later saves under the same name do
not change what an existing client samples), `Sampler`, which turns a Tinker
`SampleRequest` into `num_samples` engine requests through the shared
`EngineService` (continuous batching across every client), and `Scorer`,
which computes prompt log-probabilities (`compute_logprobs`,
`prompt_logprobs=True`) with the trainer's compiled forward on a small bank
of its own (adapters paged in from the registry, least recently used out).
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import jax
import numpy as np

from mintjax.adapters import bank as bank_lib
from mintjax.apps.tinker_service.inputs import UserError, registry_ref
from mintjax.apps.tinker_service.trainer import Trainer
from mintjax.serve.requests import GenerationRequest
from mintjax.serve.sampling import SamplingParams
from mintjax.serve.service import EngineService

_INT31 = 2**31


@dataclasses.dataclass(frozen=True)
class SamplingSession:
  session_id: str
  base_model: str
  model_path: str | None
  ref: str | None  # 'id@revision' in the registry; None samples the base


class Scorer:
  """Prompt log-probabilities under a registry revision (or the base)."""

  def __init__(self, trainer: Trainer, slots: int = 4):
    self.trainer = trainer
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    self.bank = bank_lib.init_bank(trainer.base.config, trainer.spec,
                                   sharding=dev)
    self._lru: collections.OrderedDict[str, int] = collections.OrderedDict()
    self._slots = min(slots, trainer.spec.num_slots - 1)
    self._lock = threading.Lock()

  def _slot_of(self, ref: str) -> int:
    if ref in self._lru:
      self._lru.move_to_end(ref)
      return self._lru[ref]
    if len(self._lru) < self._slots:
      slot = len(self._lru) + 1
    else:
      _, slot = self._lru.popitem(last=False)
    loaded = self.trainer.registry.load(
        ref, expect_base=self.trainer.base.fingerprint)
    self.bank = bank_lib.write_slot(self.bank, slot, loaded.weights,
                                    self.trainer.base.config,
                                    self.trainer.spec)
    self._lru[ref] = slot
    return slot

  def prompt_logprobs(self, ref: str | None, tokens: list[int]) -> np.ndarray:
    """[P] float32: log p(token_i | tokens_<i), NaN for i = 0."""
    tr = self.trainer
    with self._lock:
      slot = self._slot_of(ref) if ref is not None else 0
      row = dict(tokens=np.asarray(tokens[:-1] or tokens[:1], np.int32),
                 targets=np.asarray(tokens[1:] or tokens[:1], np.int32),
                 weights=0.0, advantages=0.0, sampling_logprobs=0.0,
                 clip_low=0.0, clip_high=0.0, kind=0, forward_only=True)
      batch = tr._pack([(slot, row)])  # pylint: disable=protected-access
      logp = np.asarray(tr.steps.token_logprobs(tr.params, self.bank, batch))
    out = np.full(len(tokens), np.nan, np.float32)
    out[1:] = logp[0, :len(tokens) - 1]
    return out


class Sampler:
  """Sampling sessions over one `EngineService` (see the module docstring)."""

  def __init__(self, service: EngineService, trainer: Trainer, *,
               base_name: str, max_len: int):
    self.service, self.trainer = service, trainer
    self.base_name, self.max_len = base_name, max_len
    self.scorer = Scorer(trainer)
    self.sessions: dict[str, SamplingSession] = {}
    self._lock = threading.Lock()

  def create_session(self, session_id: str, *, model_path: str | None,
                     base_model: str | None) -> SamplingSession:
    ref = None
    if model_path:
      try:
        ref = self.trainer.registry.resolve(registry_ref(model_path)).ref
      except LookupError as e:
        raise UserError(f"no saved weights at {model_path}: {e}") from None
    elif base_model not in (None, self.base_name):
      raise UserError(f"base model {base_model!r} is not served; this "
                      f"service serves {self.base_name!r}")
    s = SamplingSession(session_id, self.base_name, model_path, ref)
    with self._lock:
      self.sessions[session_id] = s
    return s

  def session(self, session_id: str) -> SamplingSession:
    s = self.sessions.get(session_id)
    if s is None:
      raise UserError(f"unknown sampling_session_id {session_id!r}; create "
                      "a sampling client first")
    return s

  def sample(self, session: SamplingSession, body: dict) -> dict:
    """Runs one SampleRequest (blocking); returns sequences and logprobs."""
    for k in ("topk_prompt_logprobs", "topk_sample_logprobs",
              "target_prompt_logprobs", "prompt_alt_tokens_k",
              "prompt_logprobs_last_n", "record_stability_info"):
      if body.get(k):
        raise UserError(f"{k} is not supported by this service; sample "
                        "without it (docs/TINKER.md lists what is served)")
    tokens = prompt_tokens(body.get("prompt"))
    vocab = self.trainer.base.config.vocab_size
    if not tokens or min(tokens) < 0 or max(tokens) >= vocab:
      raise UserError(f"the prompt must be 1+ token ids in [0, {vocab})")
    n = body.get("num_samples", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
      raise UserError(f"num_samples must be an int in 1..64, got {n!r}")
    params = [sampling_params(body.get("sampling_params") or {}, i)
              for i in range(n)]
    if len(tokens) + params[0].max_new_tokens > self.max_len:
      raise UserError(
          f"prompt ({len(tokens)} tokens) + max_tokens "
          f"({params[0].max_new_tokens}) exceeds this service's max_len "
          f"{self.max_len}")
    handles = [self.service.submit(GenerationRequest(
        prompt=tuple(tokens), adapter=session.ref, sampling=p))
               for p in params]
    seqs = []
    for h in handles:
      r = h.wait()
      if r.finish_reason == "error":
        raise UserError(r.error or "sampling failed")
      reason = "stop" if r.finish_reason == "stop" else "length"
      seqs.append((reason, np.asarray(r.tokens, np.int32),
                   np.asarray(r.logprobs, np.float32)))
    prompt_lp = None
    if body.get("prompt_logprobs"):
      prompt_lp = self.scorer.prompt_logprobs(session.ref, tokens)
    return {"sequences": seqs, "prompt_logprobs": prompt_lp}


def prompt_tokens(prompt) -> list[int]:
  """A ModelInput JSON ({'chunks': [{'tokens': [...]}, ...]}) -> ids."""
  if not isinstance(prompt, dict) or not isinstance(prompt.get("chunks"),
                                                     list):
    raise UserError("prompt must be a ModelInput with 'chunks'")
  out = []
  for c in prompt["chunks"]:
    if not isinstance(c, dict) or c.get("type", "encoded_text") != (
        "encoded_text"):
      raise UserError("only encoded_text prompt chunks are supported")
    toks = c.get("tokens")
    if not isinstance(toks, list) or any(
        isinstance(t, bool) or not isinstance(t, int) for t in toks):
      raise UserError("prompt chunk tokens must be a list of integers")
    out += toks
  return out


def sampling_params(p: dict, index: int) -> SamplingParams:
  """Tinker SamplingParams JSON (sample `index` of n) -> engine params."""
  known = {"max_tokens", "seed", "temperature", "top_k", "top_p", "stop"}
  unknown = set(p) - known
  if unknown:
    raise UserError(f"unknown sampling_params {sorted(unknown)}")
  max_tokens = p.get("max_tokens") or 16
  seed = p.get("seed")
  seed = (int(np.random.randint(0, _INT31)) if seed is None
          else (int(seed) + index) % _INT31)
  top_k = p.get("top_k", -1)
  stop = p.get("stop")
  stop_strs, stop_ids, ignore_eos = (), (), False
  if isinstance(stop, str):
    stop_strs = (stop,)
  elif isinstance(stop, list):
    if not stop:
      ignore_eos = True  # Tinker: [] disables every stop token, EOS too
    elif all(isinstance(s, str) for s in stop):
      stop_strs = tuple(stop)
    else:
      stop_ids = tuple(int(s) for s in stop)
  try:
    return SamplingParams(
        max_new_tokens=int(max_tokens),
        temperature=float(p.get("temperature", 1.0)),
        top_k=0 if top_k is None or top_k < 0 else int(top_k),
        top_p=float(p.get("top_p", 1.0)), seed=seed, stop=stop_strs,
        stop_token_ids=stop_ids, ignore_eos=ignore_eos)
  except ValueError as e:
    raise UserError(f"bad sampling_params: {e}") from None
