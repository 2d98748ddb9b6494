"""Batched multi-adapter evaluation, comparison and promotion.

Owns `evaluate_jobs` (held-out loss and exact-match of many (adapter slot,
examples) jobs in shared batches through one compiled forward: different
rows use different adapters), `evaluate_revisions` (many registry revisions
at once, each against its parent revision and the base, all in one bank,
each in the prompt format it was trained with) and `evaluate_and_promote`
(the `launch/eval.py` entry point; the promotion rules live in
`mintjax.eval.promotion`), and `recorded_base_source` (the base the
revisions were trained on, from their provenance).

Exact match is computed by teacher forcing: greedy decoding reproduces the
completion (including its eos) exactly when the argmax at every completion
position equals the target, so no decode loop is needed. The argmax at the
first completion position is exactly greedy decoding's first token, which
tells whether greedy would answer with an empty completion.

Prompt format: by default every revision is scored in the format its
provenance records (`mintjax.eval.prompt_format`); an explicit prompt style
overrides it. Metrics measured in the recorded format are stored as
'heldout_loss' and 'exact_match' (the names training uses); metrics measured
in an overridden or guessed format are stored under qualified names such as
'exact_match[prompt_style=raw,override]', so a number from the wrong format
never reads as the adapter's score.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mintjax import progress
from mintjax.adapters.bank import AdapterBank, bank_from_weights
from mintjax.adapters.spec import BankSpec
from mintjax.eval import prompt_format as pf
from mintjax.eval.promotion import promote
from mintjax.model import llama
from mintjax.model.base import BaseModel
from mintjax.train import data as data_lib
from mintjax.train.loss import token_cross_entropy


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Held-out metrics of one adapter on one user's examples.

  Attributes:
    loss: mean completion-token cross-entropy (token weighted).
    exact_match: fraction of examples whose greedy completion is exact.
    num_examples: examples scored.
    tokens: completion tokens scored.
    empty_outputs: examples whose greedy completion would be empty (eos
      predicted at the first completion position).
    distinct_predictions: distinct argmax tokens over all scored positions.
    distinct_targets: distinct target tokens over all scored positions.
  """

  loss: float
  exact_match: float
  num_examples: int
  tokens: int
  empty_outputs: int = 0
  distinct_predictions: int = 0
  distinct_targets: int = 0


@functools.partial(jax.jit, static_argnames=("config", "lora_impl"))
def _score(params, bank, adapter_idx_b, tokens_bt, targets_bt, mask_bt, *,
           config, lora_impl):
  logits_btv, _ = llama.forward(params, bank, adapter_idx_b, tokens_bt,
                                config=config, lora_impl=lora_impl)
  tl_bt = token_cross_entropy(logits_btv, targets_bt)
  pred_bt = jnp.argmax(logits_btv, axis=-1).astype(jnp.int32)
  hit_bt = pred_bt == targets_bt
  loss_b = jnp.sum(tl_bt * mask_bt, axis=1)
  exact_b = jnp.all(hit_bt | (mask_bt == 0), axis=1)
  return loss_b, jnp.sum(mask_bt, axis=1), exact_b, pred_bt


def _bucket(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def evaluate_jobs(base: BaseModel, bank: AdapterBank | None,
                  jobs: Sequence[tuple[object, int, Sequence]],
                  batch_size: int = 16, lora_impl: str = "auto"
                  ) -> dict[object, EvalResult]:
  """Scores many (key, slot, examples) jobs in shared mixed-adapter batches.

  Args:
    base: base model.
    bank: adapter bank (None scores the base for every job).
    jobs: (key, slot, list of `data.Example`) triples; slot 0 is the base.
    batch_size: rows per forward call (the last batch is padded).
    lora_impl: gather-LoRA implementation.

  Returns:
    key -> EvalResult.
  """
  rows = [(key, slot, ex) for key, slot, exs in jobs for ex in exs]
  empty = [key for key, _, exs in jobs if not exs]
  if empty:
    raise ValueError(f"evaluation jobs {empty} have no examples")
  sums: dict[object, list[float]] = {key: [0.0, 0.0, 0, 0]
                                     for key, _, _ in jobs}
  # Greedy-output statistics: [empty answers, predicted ids, target ids].
  outs = {key: [0, set(), set()] for key, _, _ in jobs}
  eos = base.tokenizer.eos_id if base.tokenizer is not None else None
  for start in progress.bar(range(0, len(rows), batch_size), unit="batch",
                            desc=f"eval {len(rows)} examples", leave=False):
    chunk = rows[start:start + batch_size]
    t = _bucket(max(len(ex.tokens) - 1 for _, _, ex in chunk))
    tokens = np.zeros((batch_size, t), np.int32)
    targets = np.zeros((batch_size, t), np.int32)
    mask = np.zeros((batch_size, t), np.float32)
    idx = np.zeros((batch_size,), np.int32)
    for r, (_, slot, ex) in enumerate(chunk):
      n = len(ex.tokens) - 1
      tokens[r, :n], targets[r, :n] = ex.tokens[:-1], ex.tokens[1:]
      mask[r] = ex.target_mask(t)  # chat messages: the assistant turns
      idx[r] = slot
    loss_b, tok_b, exact_b, pred_bt = jax.device_get(_score(
        base.params, bank, idx, tokens, targets, mask, config=base.config,
        lora_impl=lora_impl))
    for r, (key, _, ex) in enumerate(chunk):
      s = sums[key]
      s[0] += float(loss_b[r])
      s[1] += float(tok_b[r])
      s[2] += int(exact_b[r])
      s[3] += 1
      first = max(ex.prompt_len - 1, 0)
      o = outs[key]
      o[0] += int(eos is not None and pred_bt[r, first] == eos)
      o[1].update(pred_bt[r, first:len(ex.tokens) - 1].tolist())
      o[2].update(targets[r, first:len(ex.tokens) - 1].tolist())
  return {key: EvalResult(loss=s[0] / max(s[1], 1.0),
                          exact_match=s[2] / s[3], num_examples=s[3],
                          tokens=int(s[1]), empty_outputs=outs[key][0],
                          distinct_predictions=len(outs[key][1]),
                          distinct_targets=len(outs[key][2]))
          for key, s in sums.items()}


def _metric(name: str, fmt: pf.PromptFormat) -> str:
  """The registry metric name of `name` measured in format `fmt`."""
  if fmt.source in ("provenance", "training_config"):
    return name
  return f"{name}[prompt_style={fmt.style},{fmt.source}]"


def evaluate_revisions(base: BaseModel, registry, refs: Sequence[str],
                       heldout_by_user: Mapping[str, Sequence[Mapping]], *,
                       max_length: int = 256, prompt_style: str | None = None,
                       fallback_prompt_style: str = "raw",
                       batch_size: int = 16, lora_impl: str = "auto",
                       record: bool = True) -> list[dict]:
  """Evaluates many revisions together, each against its parent and the base.

  All revisions and their parents are loaded into one bank (slot 0 = base)
  and scored in shared batches on their adapter's held-out records. Each
  revision's records are formatted as the revision was trained (its
  provenance), and its parent and the base are scored on those same tokens.

  Args:
    base: the base model; every revision must have been trained on it.
    registry: a `mintjax.store.registry.Registry`.
    refs: adapter refs ('alice', 'alice@3', 'alice:prod').
    heldout_by_user: adapter id -> held-out records {'prompt', 'completion'}.
    max_length: tokens per example (longer ones are truncated).
    prompt_style: None (each revision's trained format) or an explicit
      'raw'/'chat' that overrides it for every revision.
    fallback_prompt_style: style for revisions whose provenance records none
      (a warning is logged).
    batch_size, lora_impl: batching and gather-LoRA implementation.
    record: store each revision's loss and exact match in the registry
      (names qualified by the format when it was not the trained one).

  Returns:
    One dict per ref: ref, adapter_id, revision, parent, loss, exact_match,
    parent_loss/parent_exact_match (None without a parent), base_loss,
    base_exact_match, num_examples, empty_outputs, distinct_predictions,
    distinct_targets, prompt_style, template_sha256, format_source,
    trained_prompt_style, trained_template_sha256 (None when unknown),
    warning (None or why the format is uncertain), data_fingerprint.

  Raises:
    BaseMismatchError: a revision was trained on another base.
    ValueError: an adapter has no held-out records, or a revision's
      recorded prompt format is malformed.
  """
  revs = [registry.resolve(r) for r in refs]
  missing = sorted({r.adapter_id for r in revs} - set(heldout_by_user))
  if missing:
    raise ValueError(
        f"no held-out records for adapters {missing}; pass a held-out JSONL "
        "with records for every evaluated adapter")
  formats = {}  # 'id@rev' -> (format used, trained format, warning)
  for rev in revs:
    ref = f"{rev.adapter_id}@{rev.revision}"
    try:
      formats[ref] = pf.eval_format(rev.provenance, prompt_style,
                                    fallback_prompt_style)
    except ValueError as e:
      raise ValueError(f"{ref}: {e}") from None
    if formats[ref][2]:
      logging.warning("%s: %s", ref, formats[ref][2])
  to_load = []
  for rev in revs:
    to_load.append(f"{rev.adapter_id}@{rev.revision}")
    if rev.parent is not None:
      to_load.append(f"{rev.adapter_id}@{rev.parent}")
  to_load = list(dict.fromkeys(to_load))
  loaded = registry.load_many(to_load, expect_base=base.fingerprint)
  weights = {ref: w for ref, (_, w) in zip(to_load, loaded)}
  slot_of = {ref: i + 1 for i, ref in enumerate(to_load)}
  targets = sorted({t for w in weights.values() for t in w.targets})
  spec = BankSpec(targets=tuple(targets),
                  max_rank=max(w.rank for w in weights.values()),
                  num_slots=len(to_load) + 1)
  bank = bank_from_weights(base.config, spec, {
      slot_of[r]: w for r, w in weights.items()})
  # Examples per (adapter, format): two revisions of one adapter trained in
  # different formats are each scored in their own.
  examples = {}
  for rev in revs:
    fmt = formats[f"{rev.adapter_id}@{rev.revision}"][0]
    key = (rev.adapter_id, fmt.key())
    if key not in examples:
      tok = fmt.tokenizer_for(base.tokenizer)
      examples[key] = [data_lib.tokenize_record(
          dict(rec, user=rev.adapter_id), tok, max_length, "truncate",
          fmt.style) for rec in heldout_by_user[rev.adapter_id]]
  jobs = []
  for rev in revs:
    ref = f"{rev.adapter_id}@{rev.revision}"
    key = (rev.adapter_id, formats[ref][0].key())
    jobs.append((ref, slot_of[ref], examples[key]))
    jobs.append((("base",) + key, 0, examples[key]))
    if rev.parent is not None:
      pref = f"{rev.adapter_id}@{rev.parent}"
      jobs.append((("parent", ref), slot_of[pref], examples[key]))
  jobs = list({repr(j[0]): j for j in jobs}.values())
  results = evaluate_jobs(base, bank, jobs, batch_size, lora_impl)
  report = []
  for rev in revs:
    ref = f"{rev.adapter_id}@{rev.revision}"
    fmt, trained, warning = formats[ref]
    res = results[ref]
    b = results[("base", rev.adapter_id, fmt.key())]
    p = results.get(("parent", ref))
    fp = data_lib.data_fingerprint(heldout_by_user[rev.adapter_id])
    if record:
      registry.record_eval(ref, _metric("heldout_loss", fmt), res.loss, fp)
      registry.record_eval(ref, _metric("exact_match", fmt), res.exact_match,
                           fp)
    report.append(dict(
        ref=ref, adapter_id=rev.adapter_id, revision=rev.revision,
        parent=rev.parent, loss=res.loss, exact_match=res.exact_match,
        parent_loss=p.loss if p else None,
        parent_exact_match=p.exact_match if p else None,
        base_loss=b.loss, base_exact_match=b.exact_match,
        num_examples=res.num_examples, empty_outputs=res.empty_outputs,
        distinct_predictions=res.distinct_predictions,
        distinct_targets=res.distinct_targets,
        prompt_style=fmt.style, template_sha256=fmt.template_sha256,
        prompt_format=fmt.describe(), format_source=fmt.source,
        trained_prompt_style=trained.style if trained else None,
        trained_template_sha256=(trained.template_sha256 if trained
                                 else None),
        warning=warning, data_fingerprint=fp))
  return report


def format_report(report: Sequence[Mapping], held: Mapping[str, str] = ()
                  ) -> str:
  """A markdown table of a report (plus why revisions were held back)."""
  lines = ["| ref | format | loss | exact | parent loss | parent exact | "
           "base loss | base exact |", "|---|---|---|---|---|---|---|---|"]
  fmt = lambda v: "-" if v is None else f"{v:.4f}"
  for r in report:
    how = f"{r['prompt_format']} ({r['format_source']})"
    if r["trained_prompt_style"] not in (None, r["prompt_style"]):
      how += f", trained {r['trained_prompt_style']}"
    lines.append(
        f"| {r['ref']} | {how} | {fmt(r['loss'])} | {fmt(r['exact_match'])} "
        f"| {fmt(r['parent_loss'])} | {fmt(r['parent_exact_match'])} | "
        f"{fmt(r['base_loss'])} | {fmt(r['base_exact_match'])} |")
  for r in report:
    if r["warning"]:
      lines.append(f"warning {r['ref']}: {r['warning']}")
  for ref, why in dict(held).items():
    lines.append(f"held back {ref}: {why}")
  return "\n".join(lines)


def evaluate_and_promote(base: BaseModel, registry, heldout_data: str,
                         refs: Sequence[str] = (), promote_tag: str | None =
                         None, loss_tolerance: float = 0.0, **kwargs
                         ) -> dict:
  """The `launch/eval.py` entry point.

  Args:
    base: base model.
    registry: an open registry.
    heldout_data: held-out JSONL file or directory (records name their user).
    refs: refs to evaluate; empty means the latest revision of every adapter
      that has held-out records.
    promote_tag: move this tag to the revisions that break no rule of
      `mintjax.eval.promotion` (None: only evaluate).
    loss_tolerance: allowed held-out loss increase before a regression.
    **kwargs: passed to `evaluate_revisions` (prompt_style, max_length, ...).

  Returns:
    {'report': rows, 'promoted': refs, 'held_back': {ref: '<rule>: why'},
    'table': markdown}.
  """
  heldout = data_lib.read_records(heldout_data)
  if not refs:
    known = {a["id"] for a in registry.list_adapters()}
    refs = sorted(u for u in heldout if u in known)
    if not refs:
      raise ValueError(
          f"none of the held-out users {sorted(heldout)[:5]}... has an "
          "adapter in the registry; pass --refs or check the registry path")
  report = evaluate_revisions(base, registry, refs, heldout, **kwargs)
  promoted, held = [], {}
  if promote_tag:
    promoted, held = promote(registry, report, promote_tag, loss_tolerance,
                             record=kwargs.get("record", True))
  return dict(report=report, promoted=promoted, held_back=held,
              table=format_report(report, held))


def recorded_base_source(registry, refs: Sequence[str] = ()) -> str:
  """The one base source the revisions' provenance names (`--base` default).

  Args:
    registry: an open registry.
    refs: the revisions to look at; empty means every adapter's latest.

  Raises:
    ValueError: no revision records a base, or they name different ones
      (the message says to pass --base).
  """
  if refs:
    revs = [registry.resolve(r) for r in refs]
  else:
    revs = [registry.resolve(a["id"]) for a in registry.list_adapters()
            if a["revisions"]]
  found: dict[str, str] = {}
  for rev in revs:
    cfg = (rev.provenance or {}).get("training_config") or {}
    if cfg.get("base"):
      found.setdefault(cfg["base"], rev.ref)
  if len(found) != 1:
    raise ValueError(
        "--base is not given and the revisions' provenance names "
        + ("no base" if not found else f"several bases {sorted(found)}")
        + "; pass --base=SOURCE (e.g. --base=smollm2)")
  return next(iter(found))
