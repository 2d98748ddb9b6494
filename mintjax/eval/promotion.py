"""Which evaluated revisions may take a tag, and why the others may not.

Owns the promotion rules: `hold_back_reason(row)` returns the first rule a
report row of `evaluate.evaluate_revisions` breaks (None: promote), and
`promote` moves the tag for the others and records every refusal in the
registry as the eval metric 'promotion_refused:<rule>' = 1.0.

An evaluation is *degenerate* when its numbers cannot tell a good adapter
from a broken one; a degenerate evaluation never promotes, whatever the loss
says. The rules, checked in this order:

  format_mismatch   the prompt style used differs from the one the
                    revision was trained with (its provenance). Chat
                    prompts are always rendered with the recorded template.
  empty_outputs     greedy decoding would answer every example with eos at
                    once (an empty completion).
  constant_outputs  the revision predicts one and the same token at every
                    scored completion position while the targets hold at
                    least two distinct tokens.
  no_exact_match    the revision scores 0 exact match and so does its
                    parent (or, for a first revision, the base): nothing
                    was recalled by anyone, which is what scoring in the
                    wrong format looks like when the format is unknown.
  regression        exact match below the parent's or the base's, or
                    held-out loss above theirs by more than the tolerance
                    (or not finite).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

RULES = ("format_mismatch", "empty_outputs", "constant_outputs",
         "no_exact_match", "regression")
REFUSED_METRIC = "promotion_refused:{rule}"


def format_mismatch(row: Mapping) -> str | None:
  trained = row.get("trained_prompt_style")
  if trained is None:
    return None
  # The chat template cannot differ: evaluation always renders chat
  # prompts with the template the provenance records (when it records one).
  if row["prompt_style"] != trained:
    return (f"evaluated with prompt style {row['prompt_style']!r} but "
            f"trained with {trained!r}; drop --prompt_style to use the "
            "trained format")
  return None


def no_exact_match(row: Mapping) -> str | None:
  ref_name = "parent" if row.get("parent_exact_match") is not None else "base"
  ref_em = row[f"{ref_name}_exact_match"]
  if row["exact_match"] == 0 and ref_em == 0:
    return (f"exact match is 0 for the revision and its {ref_name}, so the "
            "evaluation cannot tell them apart; check the prompt format and "
            "the held-out data")
  return None


def empty_outputs(row: Mapping) -> str | None:
  n = row["num_examples"]
  if n and row.get("empty_outputs", 0) == n:
    return (f"greedy decoding answers all {n} examples with an empty "
            "completion (eos first)")
  return None


def constant_outputs(row: Mapping) -> str | None:
  if (row.get("distinct_predictions") == 1 and
      row.get("distinct_targets", 0) >= 2):
    return (f"the revision predicts the same token at every completion "
            f"position while the targets hold {row['distinct_targets']} "
            "distinct tokens")
  return None


def regression(row: Mapping, loss_tolerance: float = 0.0) -> str | None:
  """Exact match below, or held-out loss above, the parent's or the base's."""
  for name in ("parent", "base"):
    ref_loss = row.get(f"{name}_loss")
    ref_em = row.get(f"{name}_exact_match")
    if ref_loss is None:
      continue
    if row["exact_match"] < ref_em:
      return (f"exact-match {row['exact_match']:.3f} is below the {name}'s "
              f"{ref_em:.3f}")
    if not math.isfinite(row["loss"]) or (
        row["loss"] > ref_loss + loss_tolerance):
      return (f"held-out loss {row['loss']:.4f} exceeds the {name}'s "
              f"{ref_loss:.4f} by more than {loss_tolerance}")
  return None


def hold_back_reason(row: Mapping, loss_tolerance: float = 0.0
                     ) -> tuple[str, str] | None:
  """(rule, reason) of the first rule `row` breaks, or None to promote."""
  checks = (format_mismatch, empty_outputs, constant_outputs, no_exact_match)
  for rule, check in zip(RULES, checks):
    why = check(row)
    if why is not None:
      return rule, why
  why = regression(row, loss_tolerance)
  return None if why is None else ("regression", why)


def promote(registry, report: Sequence[Mapping], tag: str = "prod",
            loss_tolerance: float = 0.0, *, record: bool = True
            ) -> tuple[list[str], dict[str, str]]:
  """Moves `tag` to every revision of the report that breaks no rule.

  Args:
    registry: the registry the report's revisions live in.
    report: rows of `evaluate_revisions`.
    tag: the tag to move.
    loss_tolerance: allowed held-out loss increase (regression rule).
    record: record each refusal as eval 'promotion_refused:<rule>' = 1.0.

  Returns:
    (promoted refs, {held-back ref: '<rule>: <reason>'}).
  """
  promoted, held = [], {}
  for row in report:
    verdict = hold_back_reason(row, loss_tolerance)
    if verdict is None:
      registry.tag(row["ref"], tag, reason="promote: evaluation not "
                   "degenerate, no regression vs parent and base")
      promoted.append(row["ref"])
      continue
    rule, why = verdict
    held[row["ref"]] = f"{rule}: {why}"
    if record:
      registry.record_eval(row["ref"], REFUSED_METRIC.format(rule=rule), 1.0,
                           row.get("data_fingerprint", ""))
  return promoted, held
