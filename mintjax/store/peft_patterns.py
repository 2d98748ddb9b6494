"""Bounded PEFT `rank_pattern` / `alpha_pattern` keys from untrusted folders.

An adapter_config.json comes from anyone; its pattern keys are regular
expressions that PEFT matches against every module name. This module owns
the bounds that keep a hostile key from hanging the importer (length,
variable repeats, no backreferences or lookarounds) and PEFT's
suffix-matching rule over the checked keys.
"""

from __future__ import annotations

import re
from re import _constants as sre_c  # pylint: disable=protected-access
from re import _parser as sre_parse  # pylint: disable=protected-access
from typing import Mapping

from mintjax.store.errors import InvalidAdapterError

CONFIG_FILE = "adapter_config.json"  # PEFT's name; the patterns live there

# Bounds on a rank_pattern / alpha_pattern key. Matching one key against a
# module-name suffix costs about len(name) ** (variable repeats) steps with
# backtracking; with the limits below the worst key measured ~0.03 s over
# all 210 modules of a 30-layer model, and `(.*.*)*z` is refused outright.
MAX_PATTERN_CHARS = 200
MAX_PATTERN_REPEATS = 3
MAX_PATTERN_REGEX_KEYS = 16
_REPEATS = (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, sre_c.POSSESSIVE_REPEAT)
_REFUSED_OPS = {sre_c.GROUPREF: "a backreference",
                sre_c.GROUPREF_EXISTS: "a conditional group",
                sre_c.ASSERT: "a lookahead/lookbehind",
                sre_c.ASSERT_NOT: "a negative lookahead/lookbehind"}


def _walk(items, inside_repeat: bool, counts: dict) -> None:
  """Counts variable repeats; raises ValueError on an explosive construct."""
  for op, av in items:
    if op in _REFUSED_OPS:
      raise ValueError(f"it uses {_REFUSED_OPS[op]}")
    if op in _REPEATS:
      lo, hi, body = av
      if lo != hi:
        counts["repeats"] += 1
      if inside_repeat and hi > 1:
        raise ValueError("it nests a quantifier inside a quantified group")
      _walk(body, inside_repeat or hi > 1, counts)
    elif op == sre_c.SUBPATTERN:
      _walk(av[-1], inside_repeat, counts)
    elif op == sre_c.BRANCH:
      if inside_repeat:
        raise ValueError("it repeats an alternation (a|b)*; use a character "
                         "class [ab]* instead")
      for branch in av[1]:
        _walk(branch, inside_repeat, counts)
    elif op == sre_c.ATOMIC_GROUP:
      _walk(av, inside_repeat, counts)


def check_pattern(key, where: str) -> int:
  """Refuses a pattern key that could backtrack for long; returns its cost.

  Args:
    key: a `rank_pattern` / `alpha_pattern` key (a regex in PEFT).
    where: file and field, for the error message.

  Returns:
    the number of variable repeats in the key (0 = plain name, linear time).

  Raises:
    InvalidAdapterError: naming the key, why it is refused, and the fix.
  """
  fix = (f"; use a module name suffix such as 'q_proj' or "
         f"'layers.3.mlp.down_proj', or a simple regex with at most "
         f"{MAX_PATTERN_REPEATS} quantifiers, none nested")
  if not isinstance(key, str) or not key:
    raise InvalidAdapterError(f"{where}: pattern key {key!r} is not a "
                              f"non-empty string{fix}")
  if len(key) > MAX_PATTERN_CHARS:
    raise InvalidAdapterError(
        f"{where}: pattern key {key[:40]!r}... is {len(key)} characters, "
        f"more than {MAX_PATTERN_CHARS}{fix}")
  counts = {"repeats": 0}
  try:
    _walk(sre_parse.parse(key), False, counts)
  except re.error as e:
    raise InvalidAdapterError(
        f"{where}: pattern key {key!r} is not a valid regex ({e}){fix}"
    ) from None
  except ValueError as e:
    raise InvalidAdapterError(
        f"{where}: pattern key {key!r} is refused because {e} (it could "
        f"make matching take exponential time){fix}") from None
  if counts["repeats"] > MAX_PATTERN_REPEATS:
    raise InvalidAdapterError(
        f"{where}: pattern key {key!r} has {counts['repeats']} quantifiers, "
        f"more than {MAX_PATTERN_REPEATS} (matching time grows as name "
        f"length ** quantifiers){fix}")
  return counts["repeats"]


def checked_patterns(cfg: Mapping, field: str, kind, folder: str) -> dict:
  """The config's `field` ({pattern: value}) after every key is checked."""
  patterns = cfg.get(field) or {}
  where = f"{folder}/{CONFIG_FILE} {field}"
  if not isinstance(patterns, dict):
    raise InvalidAdapterError(
        f"{where} must be a JSON object {{module pattern: value}}, found "
        f"{type(patterns).__name__}")
  regex_keys = 0
  for key, value in patterns.items():
    regex_keys += bool(check_pattern(key, where))
    if (isinstance(value, bool) or not isinstance(value, kind) or
        not value > 0):
      raise InvalidAdapterError(
          f"{where}[{key!r}] must be a positive number, found {value!r}")
  if regex_keys > MAX_PATTERN_REGEX_KEYS:
    raise InvalidAdapterError(
        f"{where} has {regex_keys} keys with quantifiers, more than "
        f"{MAX_PATTERN_REGEX_KEYS}; list module names instead")
  return {key: (re.compile(key), value) for key, value in patterns.items()}


def pattern_key(patterns: Mapping, module_name: str):
  r"""PEFT's `get_pattern_key`: the first key matching a dotted suffix.

  Equivalent to `re.match(rf"(.*\.)?({key})$", module_name)`, but each
  suffix is matched by the precompiled key alone (no leading `.*` to
  backtrack over); keys were bounded by `check_pattern`.
  """
  parts = module_name.split(".")
  suffixes = [".".join(parts[i:]) for i in range(len(parts))]
  for key, (compiled, _) in patterns.items():
    if any(compiled.fullmatch(s) for s in suffixes):
      return key
  return None
