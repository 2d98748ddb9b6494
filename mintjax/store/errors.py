"""Errors raised by the adapter registry and its weights store.

Owns the exception hierarchy every caller of `mintjax.store` catches. Each
error message says what was expected, what was found and how to fix it; every
operation that raises one leaves the catalog and the weights store unchanged
(a refused publish may leave unreferenced shard files, which `gc` deletes
once their reservation's lease has expired; no reader ever sees them).
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
  """Stored bytes are missing or fail their recorded checksum (run `verify`)."""


class CatalogError(RegistryError):
  """The catalog database could not be read or written (busy, damaged, or of
  another schema version); the message names the database and the fix."""


class LeaseExpiredError(RegistryError):
  """A publish outlived its reservation's lease, so `gc` may have reclaimed
  its shards; nothing of it became visible. Publish again."""
