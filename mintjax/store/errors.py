"""Errors raised by the adapter registry and its weights store.

Owns the exception hierarchy every caller of `mintjax.store` catches. Each
error message says what was expected, what was found and how to fix it; every
operation that raises one leaves the catalog and the weights store unchanged.
"""

from __future__ import annotations


class RegistryError(ValueError):
  """Base class: a registry operation was refused (state is unchanged)."""


class UnknownRefError(RegistryError, KeyError):
  """A reference ('alice', 'alice@3', 'alice:prod') names nothing stored."""

  def __str__(self) -> str:  # KeyError would repr() the message.
    return str(self.args[0]) if self.args else ""


class InvalidAdapterError(RegistryError):
  """An adapter id, spec, tag or weights tensor is malformed or mismatched."""


class BaseMismatchError(RegistryError):
  """An adapter was trained on a different base model than requested."""


class StoreCorruptionError(RegistryError):
  """Stored bytes no longer hash to the recorded sha256 (run `verify`)."""
