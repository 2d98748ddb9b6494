"""The multi-adapter decode engine: the Python serving API.

Owns `Engine` (`EngineConfig` lives in `mintjax.serve.engine_config`,
request and result types in `mintjax.serve.requests`; all are re-exported
here), which ties the compiled steps (`mintjax.serve.steps`), the
adapter residency tiers (`mintjax.serve.residency`) and continuous batching
(`mintjax.serve.scheduler`) together:

  engine = Engine(base, registry, EngineConfig(num_slots=16, max_batch=8))
  results = engine.generate([{"prompt": "hi", "adapter": "alice:prod"}])
  for event in engine.stream(requests): ...

Base and adapted requests share one batch (the base is bank slot 0). Every
device call serves the whole batch; Python runs once per call, not per
token. The engine is synchronous and single-threaded. Its step-wise API
(`submit`, `step`, `cancel`) is what `stream` is built on and what a service
loop drives: requests submitted between two `step` calls join the running
batch at the next one (`mintjax.serve.service.EngineService` runs that loop
in a thread for concurrent callers).
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from mintjax import progress
from mintjax import sharding
from mintjax.adapters import bank as bank_lib
from mintjax.adapters import slot_dense
from mintjax.adapters.spec import BankSpec
from mintjax.model import fused, llama
from mintjax.model.base import BaseModel
from mintjax.model.kv_cache import init_cache
from mintjax.serve import sampling as sampling_lib
from mintjax.serve import steps as steps_lib
from mintjax.serve.engine_config import DEFAULT_MAX_RANK, EngineConfig  # pylint: disable=unused-import  # re-exported
from mintjax.serve.residency import AdapterSource, InMemoryAdapters, Residency
from mintjax.serve.requests import (GenerationRequest, GenerationResult,
                                    RequestError, TokenEvent)
from mintjax.serve.sampling import SamplingError, SamplingParams
from mintjax.serve.scheduler import Scheduler, Sequence
from mintjax.store.revision import check_base

class Engine:
  """Batched multi-adapter generation over one base model.

  Args:
    base: the base model (its tokenizer is used for text and chat).
    source: adapter store (e.g. `mintjax.store.registry.Registry`), or a
      mapping of adapter names to Hugging Face PEFT LoRA folders (served
      without a registry; `InMemoryAdapters.from_peft_folders`); None
      serves the base only.
    config: engine shapes and policies. Its max_rank / targets left None
      are sized from the adapters to serve; set ones that cannot hold them
      are refused here, not per request (`EngineConfig.sized_for`).
    mesh: optional device mesh; parameters, bank and cache are placed by
      their logical axes.
    warmup: compile every step now so serving never compiles.
    refs: the adapter refs this engine will serve (default: every adapter
      of the source); they size and check the bank.
  """

  def __init__(self, base: BaseModel, source: AdapterSource | None = None,
               config: EngineConfig = EngineConfig(), mesh: Mesh | None = None,
               warmup: bool = True, *, refs: Iterable[str] | None = None):
    if isinstance(source, Mapping):
      source = InMemoryAdapters.from_peft_folders(source, base)
    config = config.sized_for(source, refs)
    if mesh is not None and config.layer_layout == "per_layer":
      raise ValueError(
          "EngineConfig.layer_layout='per_layer' is a one-device layout; "
          "with a mesh use 'stacked' (or 'auto')")
    self.base = base
    self.config = config
    self.mesh = mesh
    self.tokenizer = base.tokenizer
    spec = config.spec()
    self.spec = spec
    per_layer = config.per_layer(mesh)
    self.matmul = config.matmul(per_layer)
    # Serving layout: weights in config.dtype, q/k/v and gate/up fused.
    params, mc, axes = fused.serving_layout(
        base.params, base.config, llama.param_logical_axes(base.config),
        dtype=config.dtype, fuse=config.fuse_projections,
        tensor_shards=mesh.shape.get("tensor", 1) if mesh is not None else 1,
        per_layer=per_layer, matmul=self.matmul)
    self.model_config = mc
    self._slot_dense = (_slot_dense_cache(config, spec, mc, params,
                                          packed=self.matmul == "amx")
                        if per_layer else None)
    bank_sh = None
    if mesh is not None:
      params = sharding.shard_tree(params, axes, mesh)
      bank_sh = sharding.logical_sharding(
          bank_lib.bank_logical_axes(spec), bank_lib.bank_shapes(mc, spec),
          mesh)
      cache_sh = steps_lib.cache_sharding(mc, config.max_batch,
                                          config.max_len, mesh)
    else:
      # Commit params, bank and cache to one device: a step's compiled
      # program is keyed on whether each argument is committed, and Orbax
      # restores committed arrays while fresh ones are not, so a mix would
      # compile a second program once the (committed) written bank arrives.
      bank_sh = cache_sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      params = jax.device_put(params, bank_sh)
    self.params = params
    bank = bank_lib.init_bank(mc, spec, sharding=bank_sh)
    self.residency = (Residency(source, base.fingerprint, mc, spec, bank,
                                config.host_cache_bytes)
                      if source is not None else None)
    self._bank = bank
    self.cache = init_cache(mc, config.max_batch, config.max_len,
                            sharding=cache_sh,
                            per_layer=per_layer)
    self.fns = steps_lib.make_step_fns(
        mc, batch=config.max_batch, max_len=config.max_len,
        steps_per_call=config.steps_per_call, lora_impl=config.lora_impl,
        mesh=mesh)
    self.scheduler = Scheduler(config.max_batch, self.residency,
                               config.lookahead)
    b = config.max_batch
    self._state = dict(token_b=np.zeros(b, np.int32), pos_b=np.zeros(b, np.int32),
                       remaining_b=np.zeros(b, np.int32),
                       active_b=np.zeros(b, bool),
                       adapter_idx_b=np.zeros(b, np.int32))
    self._rows = sampling_lib.empty_rows(b)
    # Decode compiles once per LoRA rank width; each call takes the
    # narrowest that holds its rows' true ranks (padded rank is free), and
    # width 0, a program with no LoRA at all, when every row is a base row.
    self._rank_buckets = (0,) + (bank_lib.rank_buckets(spec.max_rank)
                                 if source is not None else ())
    self._host_ranks = (None, None)  # (bank it was read from, ranks [S])
    # Finish events of requests refused at submit, returned by the next step.
    self._pending: list[TokenEvent] = []
    self._counters = dict(requests=0, errors=0, generated_tokens=0,
                          decode_calls=0, decode_tokens=0, decode_seconds=0.0,
                          prefill_calls=0, prefill_tokens=0,
                          prefill_seconds=0.0)
    self.compilations_at_warmup = None
    self._compiles_at_warmup = steps_lib.backend_compiles()
    if warmup:
      self.warmup()

  @property
  def bank(self) -> bank_lib.AdapterBank:
    return self.residency.bank if self.residency is not None else self._bank

  def _step_bank(self, rank: int | None = None):
    """The bank a step reads: None for rank width 0 (no row has an adapter:
    the LoRA-free program) or an engine without adapters; else the
    slot-dense view at rank width `rank` (default the bank's max rank) when
    this engine uses it, else the stacked bank."""
    if rank == 0 or self.residency is None:  # nothing to adapt: no LoRA
      return None
    if self._slot_dense is None:
      return self.bank
    return self._slot_dense.get(self.bank, rank or self.spec.max_rank)

  # --- compilation ---------------------------------------------------------

  def warmup(self) -> None:
    """Compiles prefill for every bucket, decode, and the slot write."""
    c = self.config
    p = c.prefill_batch
    drop = np.full(p, c.max_batch, np.int32)  # every row dropped: no effect
    prow = _take_rows(sampling_lib.empty_rows(c.max_batch), np.zeros(p, int))
    # One bar step per compiled program: the prefill buckets, then decode.
    bar = progress.bar(total=len(c.buckets) + len(self._rank_buckets),
                       unit="program",
                       desc="warm-up compiles", leave=False)
    for t in c.buckets:
      self.cache, tok, *_ = self.fns.prefill(
          self.params, self._step_bank(), self.cache,
          np.zeros((p, t), np.int32),
          np.ones(p, np.int32), drop, np.zeros(p, np.int32), prow)
      bar.update(1)
    for r in self._rank_buckets:  # one decode program per LoRA rank width
      self.cache, *_ = self.fns.decode(
          self.params, self._step_bank(r), self.cache,
          steps_lib.DecodeState(**{k: v.copy()
                                   for k, v in self._state.items()}),
          self._rows, lora_rank=r or None)
      bar.update(1)
    if self.residency is not None:
      # A slot write of zeros into an empty slot compiles the writer once.
      self.residency.bank = bank_lib.write_slot(
          self.residency.bank, 1, None, self.base.config, self.spec)
    jax.block_until_ready(tok)
    bar.close()
    self.compilations_at_warmup = steps_lib.compiled_count(self.fns)
    self._compiles_at_warmup = steps_lib.backend_compiles()

  def compilations_since_warmup(self) -> int:
    """Step programs compiled after warm-up (0 when adapters are data)."""
    return steps_lib.compiled_count(self.fns) - (
        self.compilations_at_warmup or 0)

  # --- requests ------------------------------------------------------------

  def _prepare(self, index: int, request) -> Sequence:
    rid = str(index)
    try:
      if isinstance(request, Mapping):
        request = GenerationRequest.from_dict(request)
      if not isinstance(request, GenerationRequest):
        raise RequestError(
            f"a request must be a GenerationRequest or a dict, got "
            f"{type(request).__name__}")
      rid = str(request.request_id) if request.request_id is not None else rid
      seq = Sequence(index, rid, self._prompt_ids(request), request.sampling,
                     adapter=request.adapter)
      vocab = self.base.config.vocab_size
      eos = self.tokenizer.eos_ids if self.tokenizer is not None else None
      seq.stop_ids = request.sampling.stop_ids(eos, vocab)
      if request.sampling.stop and self.tokenizer is None:
        raise RequestError("stop strings need a tokenizer; this base has none")
      if request.sampling.top_k > vocab:
        raise SamplingError(
            f"top_k={request.sampling.top_k} exceeds the vocabulary size "
            f"{vocab}; use 0 (no limit) or a smaller top_k")
      if request.adapter is not None:
        seq.key = self._resolve(request.adapter)
    # TypeError too: a request object of the wrong shape fails alone and
    # never takes the rest of the batch down.
    except (RequestError, SamplingError, LookupError, ValueError,
            TypeError) as e:
      seq = Sequence(index, rid, [], SamplingParams(),
                     adapter=getattr(request, "adapter", None))
      seq.fail(f"{type(e).__name__}: {e}")
    return seq

  def _prompt_ids(self, r: GenerationRequest) -> list[int]:
    if (r.prompt is None) == (r.messages is None):
      raise RequestError(
          "give exactly one of 'prompt' (text or token ids) and 'messages'")
    if r.messages is not None or isinstance(r.prompt, str):
      if self.tokenizer is None:
        raise RequestError("text prompts need a tokenizer; pass token ids")
      text = (self.tokenizer.apply_chat_template(list(r.messages))
              if r.messages is not None else r.prompt)
      ids = self.tokenizer.encode(text, add_bos=r.add_bos)
    else:
      vocab = self.base.config.vocab_size
      # Floats, bools and nulls are refused, not truncated to some id.
      bad = [t for t in r.prompt if isinstance(t, bool) or not isinstance(
          t, (int, np.integer)) or not 0 <= t < vocab]
      if bad:
        raise RequestError(
            f"prompt token ids must be integers in [0, {vocab}), got "
            f"{bad[:3]!r:.60}; pass valid ids or a text prompt")
      ids = [int(t) for t in r.prompt]
    if not ids:
      raise RequestError("the prompt is empty; give at least one token")
    if len(ids) > self.config.max_len:
      raise RequestError(
          f"the prompt has {len(ids)} tokens but this engine's max_len is "
          f"{self.config.max_len}; shorten the prompt or raise max_len")
    return ids

  def _resolve(self, ref: str) -> str:
    if self.residency is None:
      raise RequestError(
          f"adapter {ref!r} requested but this engine has no adapter source; "
          "pass a registry to Engine(...)")
    if not isinstance(ref, str) or not ref:
      raise RequestError(f"adapter ref must be a non-empty string, got {ref!r}")
    rev = self.residency.source.resolve(ref)
    check_base(rev.ref, rev.base_fingerprint, self.base.fingerprint)
    return rev.ref

  def resolve(self, ref: str) -> str:
    """The 'id@revision' an adapter ref names.

    Raises:
      LookupError: no such adapter, revision or tag.
      RequestError: no adapter source.
      BaseMismatchError: the adapter was trained on another base.
    """
    return self._resolve(ref)

  def pin(self, ref: str) -> int:
    """Keeps an adapter resident in a device slot; returns the slot."""
    return self.residency.pin(self._resolve(ref))

  def unpin(self, ref: str) -> None:
    self.residency.unpin(self._resolve(ref))

  # --- the serving loop ----------------------------------------------------

  def generate(self, requests: Iterable[GenerationRequest | Mapping]
               ) -> list[GenerationResult]:
    """Generates for every request; results come back in request order."""
    results: dict[int, GenerationResult] = {}
    for ev in self.stream(requests):
      if ev.result is not None:
        results[ev.index] = ev.result
    return [results[i] for i in sorted(results)]

  def stream(self, requests: Iterable[GenerationRequest | Mapping]
             ) -> Iterator[TokenEvent]:
    """Yields each token as it is produced, then each request's result."""
    if not self.idle:
      raise RuntimeError("the engine is already serving; finish that stream "
                         "before starting another")
    for i, r in enumerate(requests):
      self.submit(r, index=i)
    try:
      while not self.idle:
        yield from self.step()
    finally:
      # A consumer that stops early (or an error) must not leave rows or
      # slot references behind: the next stream starts from an idle engine.
      self.cancel_all()
      if self.residency is not None:
        self.residency.flush_stats()

  @property
  def idle(self) -> bool:
    """No request is queued, running or waiting to report its refusal."""
    return self.scheduler.idle and not self._pending

  def submit(self, request: GenerationRequest | Mapping, index: int) -> bool:
    """Queues one request; it joins the batch at the next `step`.

    Args:
      request: the request.
      index: the caller's key for it (unique among unfinished requests);
        every `TokenEvent` of the request carries it.

    Returns:
      True when queued; False when refused (its error result is returned by
      the next `step`).
    """
    seq = self._prepare(index, request)
    self._counters["requests"] += 1
    if seq.done:
      self._pending.append(self._finish(seq))
      return False
    self.scheduler.submit(seq)
    return True

  def step(self) -> list[TokenEvent]:
    """One round of serving: prefetch, admit, prefill the new, decode all.

    Returns:
      the tokens produced and the results of requests that finished, in
      order (empty when idle).
    """
    events, self._pending = self._pending, []
    for seq in self.scheduler.prefetch():
      events.append(self._finish(seq))
    admitted, failed = self.scheduler.admit()
    events.extend(self._finish(seq) for seq in failed)
    events.extend(self._prefill(admitted))
    if self._state["active_b"].any():
      events.extend(self._decode())
    return events

  def cancel(self, index: int, reason: str = "cancelled") -> TokenEvent | None:
    """Ends a queued or running request now and frees its row and slot.

    Returns:
      its result event (finish_reason 'cancelled', `error` = reason), or
      None when no unfinished request has this index.
    """
    seq = next((s for s in self.scheduler.queue if s.index == index), None)
    if seq is not None:
      self.scheduler.queue.remove(seq)
    else:
      seq = next((s for s in self.scheduler.rows
                  if s is not None and s.index == index), None)
    if seq is None:
      return None
    seq.finish_reason, seq.error = "cancelled", reason
    return self._finish(seq)

  def cancel_all(self) -> None:
    """Drops every queued, running and refused request without results."""
    leftover = list(self.scheduler.queue) + self.scheduler.running
    self.scheduler.queue.clear()
    for seq in leftover:
      self.scheduler.finish(seq)
    self._pending.clear()
    self._state["active_b"][:] = False

  def _finish(self, seq: Sequence) -> TokenEvent:
    if seq.row >= 0:  # read before `finish` forgets the row
      self._state["active_b"][seq.row] = False
      self._rows.top_logprobs_b[seq.row] = 0  # no top-k work for idle rows
    self.scheduler.finish(seq)
    if seq.finish_reason == "error":
      self._counters["errors"] += 1
    if self.tokenizer is not None and seq.tokens and not seq.params.stop:
      seq.text = self.tokenizer.decode(seq.tokens)
    result = GenerationResult(
        request_id=seq.request_id, tokens=list(seq.tokens),
        text=seq.text, logprobs=list(seq.logprobs),
        finish_reason=seq.finish_reason, adapter=seq.adapter,
        revision=seq.key, prompt_tokens=len(seq.prompt_ids), error=seq.error,
        top_logprobs=seq.extra.get("top_logprobs"),
        prompt_logprobs=seq.extra.get("prompt_logprobs"),
        prompt_top_logprobs=seq.extra.get("prompt_top_logprobs"))
    return TokenEvent(seq.request_id, seq.index, None, None, result)

  def _emit(self, seq: Sequence, token: int, logprob: float, active: bool,
            remaining: int, top=None) -> Iterator[TokenEvent]:
    """Records one generated token; finishes the sequence when it ends.

    `top` is (ids [K], logprobs [K]) of this position's most likely tokens.
    """
    seq.tokens.append(token)
    seq.logprobs.append(logprob)
    pairs = None
    if seq.params.top_logprobs:
      pairs = sampling_lib.top_pairs(*top, seq.params.top_logprobs)
      seq.extra.setdefault("top_logprobs", []).append(pairs)
    self._counters["generated_tokens"] += 1
    yield TokenEvent(seq.request_id, seq.index, token, logprob,
                     top_logprobs=pairs)
    if self.tokenizer is not None and seq.params.stop:
      # Only stop strings need the text while decoding; other requests are
      # decoded once, in `_finish` (no per-token work growing with length).
      seq.text = self.tokenizer.decode(seq.tokens)
    cut = min((seq.text.find(s) for s in seq.params.stop
               if s in seq.text), default=-1)
    if cut >= 0:
      seq.text = seq.text[:cut]
      seq.finish_reason = "stop"
    elif not active:
      if token in seq.stop_ids:
        seq.finish_reason = "stop"
      elif remaining <= 0:
        seq.finish_reason = "length"
      else:
        seq.finish_reason = "max_len"
    if seq.done:
      row = seq.row
      self._state["active_b"][row] = False
      yield self._finish(seq)

  def _prefill(self, admitted: list[Sequence]) -> Iterator[TokenEvent]:
    c = self.config
    by_bucket: dict[int, list[Sequence]] = {}
    for s in admitted:
      bucket = next(b for b in c.buckets if b >= len(s.prompt_ids))
      by_bucket.setdefault(bucket, []).append(s)
    for bucket, seqs in sorted(by_bucket.items()):
      for start in range(0, len(seqs), c.prefill_batch):
        group = seqs[start:start + c.prefill_batch]
        yield from self._prefill_group(bucket, group)

  def _prefill_group(self, bucket: int, group: list[Sequence]
                     ) -> Iterator[TokenEvent]:
    c = self.config
    p = c.prefill_batch
    tokens = np.zeros((p, bucket), np.int32)
    lengths = np.ones(p, np.int32)
    rows = np.full(p, c.max_batch, np.int32)
    slots = np.zeros(p, np.int32)
    for i, s in enumerate(group):
      tokens[i, :len(s.prompt_ids)] = s.prompt_ids
      lengths[i] = len(s.prompt_ids)
      rows[i] = s.row
      slots[i] = s.slot
      sampling_lib.set_row(self._rows, s.row, s.params, s.stop_ids)
    prow = _take_rows(self._rows, np.where(rows < c.max_batch, rows, 0))
    t0 = time.perf_counter()
    self.cache, tok_p, lp_p, tid_pk, tlp_pk = self.fns.prefill(
        self.params, self._step_bank(), self.cache, tokens, lengths, rows,
        slots, prow)
    tok_p, lp_p = np.asarray(tok_p), np.asarray(lp_p)
    tid_pk, tlp_pk = np.asarray(tid_pk), np.asarray(tlp_pk)
    self._counters["prefill_seconds"] += time.perf_counter() - t0
    self._counters["prefill_calls"] += 1
    self._counters["prefill_tokens"] += int(sum(len(s.prompt_ids)
                                                for s in group))
    for i, s in enumerate(group):
      if s.params.prompt_logprobs is not None:
        self._score_prompt(s, tokens[i:i + 1], slots[i:i + 1])
    st = self._state
    for i, s in enumerate(group):
      b, n = s.row, len(s.prompt_ids)
      token = int(tok_p[i])
      remaining = s.params.max_new_tokens - 1
      active = (token not in s.stop_ids) and remaining > 0 and n < c.max_len
      st["token_b"][b], st["pos_b"][b] = token, n
      st["remaining_b"][b], st["active_b"][b] = remaining, active
      st["adapter_idx_b"][b] = s.slot
      yield from self._emit(s, token, float(lp_p[i]), active, remaining,
                            (tid_pk[i], tlp_pk[i]))

  def _score_prompt(self, seq: Sequence, tokens_1t, slot_1) -> None:
    """Prompt log-probabilities of one request (its own forward pass).

    The scoring step compiles once per prompt bucket on first use: only
    requests with `prompt_logprobs` run it.
    """
    lp_1t, ids_1tk, tlp_1tk = (np.asarray(x) for x in self.fns.score(
        self.params, self._step_bank(), tokens_1t, slot_1))
    n, k = len(seq.prompt_ids), seq.params.prompt_logprobs
    # Position 0 has no context; token t is scored at position t - 1.
    seq.extra["prompt_logprobs"] = [None] + [float(lp_1t[0, t])
                                             for t in range(n - 1)]
    if k:
      seq.extra["prompt_top_logprobs"] = [None] + [
          sampling_lib.top_pairs(ids_1tk[0, t], tlp_1tk[0, t], k)
          for t in range(n - 1)]

  def _lora_rank(self) -> int:
    """The rank width of this decode call: the narrowest bucket holding
    the true rank of every active row's slot, 0 when all are base rows (the
    bank's ranks are read to the host once per bank version, not per
    call)."""
    if len(self._rank_buckets) == 1:
      return self._rank_buckets[0]
    bank = self.bank
    if self._host_ranks[0] is not bank:
      self._host_ranks = (bank, np.asarray(bank.rank))
    st = self._state
    return bank_lib.rank_bucket(
        self._rank_buckets, self._host_ranks[1][st["adapter_idx_b"][
            st["active_b"]]])

  def _decode(self) -> Iterator[TokenEvent]:
    t0 = time.perf_counter()
    state = steps_lib.DecodeState(**self._state)
    rank = self._lora_rank()
    self.cache, state, toks, lps, valid, tid, tlp = self.fns.decode(
        self.params, self._step_bank(rank), self.cache, state, self._rows,
        lora_rank=rank or None)
    toks, lps, valid = np.asarray(toks), np.asarray(lps), np.asarray(valid)
    # Top-k rows come to the host only when some row asked for them.
    want_top = bool(self._rows.top_logprobs_b.any())
    tid = np.asarray(tid) if want_top else None
    tlp = np.asarray(tlp) if want_top else None
    new = {k: np.array(v) for k, v in vars(state).items()}
    self._counters["decode_seconds"] += time.perf_counter() - t0
    self._counters["decode_calls"] += 1
    self._counters["decode_tokens"] += int(valid.sum())
    for b, seq in enumerate(self.scheduler.rows):
      if seq is None:
        continue
      steps = np.flatnonzero(valid[b])
      for j, n in enumerate(steps):
        last = j == len(steps) - 1
        active = bool(new["active_b"][b]) if last else True
        remaining = int(new["remaining_b"][b]) if last else 1
        top = (tid[b, n], tlp[b, n]) if want_top else None
        yield from self._emit(seq, int(toks[b, n]), float(lps[b, n]), active,
                              remaining, top)
        if seq.done:
          break
    # Rows finished on the host (stop strings) stay inactive on device too.
    still = new["active_b"] & self._state["active_b"]
    self._state = new
    self._state["active_b"] = still

  # --- statistics ----------------------------------------------------------

  def stats(self) -> dict:
    """Engine counters and residency counters per tier."""
    c = dict(self._counters)
    c["decode_tokens_per_s"] = (c["decode_tokens"] / c["decode_seconds"]
                                if c["decode_seconds"] else 0.0)
    c["backend_compiles_since_warmup"] = (
        steps_lib.backend_compiles() - self._compiles_at_warmup)
    c["compilations_since_warmup"] = self.compilations_since_warmup()
    if self.residency is not None:
      c["residency"] = self.residency.stats()
    return c


def _slot_dense_cache(config: EngineConfig, spec: BankSpec, model_config,
                      params, packed: bool
                      ) -> slot_dense.SlotDenseCache | None:
  """The slot-dense LoRA view cache of a per-layer engine when its bank
  allows it: dense targets only, a model without MLA or
  experts, and a bank of at most 4 x max_batch slots (the view reads every
  slot each step, the gather only the rows' own)."""
  layers = params["layers"]
  if (not slot_dense.supports(spec.targets)
      or model_config.uses_mla or model_config.num_moe_layers
      or spec.num_slots > 4 * config.max_batch):
    return None
  groups = slot_dense.groups_for(spec.targets, qkv="qkv" in layers[0],
                                 gate_up="gate_up" in layers[0])
  return slot_dense.SlotDenseCache(groups, config.dtype, packed=packed)


def _take_rows(rows: sampling_lib.RowSampling, idx) -> sampling_lib.RowSampling:
  return jax.tree.map(lambda x: np.asarray(x)[idx], rows)
