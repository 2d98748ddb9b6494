"""Registry locations: what a registry URL names.

Owns `RegistryLocation` and `parse_location`, the one parser of the strings
and dicts `Registry.open` accepts, so every tool (`mint`, the crash test,
the fleet) names a registry the same way:

  /dir  or  file:///dir
      the embedded default: SQLite catalog at /dir/catalog.sqlite, weights
      under /dir.
  sqlite:///abs/catalog.sqlite?store=STORE
      a local SQLite catalog with the weights elsewhere.
  postgresql://user:pw@host:port/db?schema=NAME&store=STORE
      (also postgres://) a PostgreSQL catalog shared by many hosts; the
      tables live in schema NAME (default 'mintjax'), so one database can
      hold several registries. STORE is required: every host must reach
      the same weights.
  {'catalog': path or URL, 'store': STORE, 'compression': ...}
      the dict form.

STORE is a directory, file://, gs://bucket/prefix or
s3://bucket/prefix[?endpoint=URL&region=NAME] (see
`mintjax.store.weights.kvstore_spec`). `store=` must be the last query
parameter: everything after it is the store URL, its own query included,
so an s3 endpoint needs no escaping. Anything else is refused with a line
saying what form was expected.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from typing import Mapping

from mintjax.store.errors import RegistryError

__all__ = ["RegistryLocation", "parse_location", "redact"]

PG_SCHEMES = ("postgresql://", "postgres://")
DEFAULT_PG_SCHEMA = "mintjax"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclasses.dataclass(frozen=True)
class RegistryLocation:
  """Where a registry's catalog and weights live.

  Attributes:
    backend: 'sqlite' or 'postgresql'.
    catalog: SQLite file path, or the PostgreSQL connection URL without
      mintjax's own parameters (schema, store).
    store: the weights location (path, URL or tensorstore kvstore dict).
    schema: PostgreSQL schema holding the tables (None for SQLite).
    compression: None or 'zstd' (dict form only).
  """

  backend: str
  catalog: str
  store: object
  schema: str | None = None
  compression: str | None = None

  @property
  def display(self) -> str:
    """The catalog for messages, without a password."""
    if self.backend == "sqlite":
      return self.catalog
    return f"{redact(self.catalog)} schema {self.schema}"


def redact(url: str) -> str:
  """A URL with its password replaced by '***'."""
  parts = urllib.parse.urlsplit(url)
  if parts.password is None:
    return url
  netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
  return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _split_store(url: str) -> tuple[str, str | None]:
  """(url without '&store=...' / '?store=...', the store URL or None)."""
  m = re.search(r"[?&]store=", url)
  if m is None:
    return url, None
  store = url[m.end():]
  if "://" not in store and "%" in store:
    store = urllib.parse.unquote(store)  # A percent-encoded store URL.
  return url[:m.start()], store or None


def _postgres(url: str) -> RegistryLocation:
  base, store = _split_store(url)
  parts = urllib.parse.urlsplit(base)
  query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
  schema = DEFAULT_PG_SCHEMA
  kept = []
  for k, v in query:
    if k == "schema":
      schema = v
    else:
      kept.append((k, v))  # libpq's own parameters (sslmode, ...).
  if not _SCHEMA_NAME.match(schema) or schema.startswith("pg_"):
    raise RegistryError(
        f"registry URL {redact(url)!r} has schema={schema!r}; use lower-case "
        "letters, digits and '_' (at most 63, not starting with a digit or "
        "'pg_')")
  if store is None:
    raise RegistryError(
        f"registry URL {redact(url)!r} names no weights store; a shared "
        "catalog needs shared weights: append '&store=s3://bucket/prefix' "
        "(or gs://..., or a directory every host mounts)")
  if not parts.hostname and "host=" not in parts.query:
    raise RegistryError(
        f"registry URL {redact(url)!r} has no host; expected "
        "postgresql://user:password@host:port/database?store=...")
  catalog = urllib.parse.urlunsplit(
      parts._replace(query=urllib.parse.urlencode(kept)))
  return RegistryLocation("postgresql", catalog, store, schema)


def parse_location(location, compression: str | None = None
                   ) -> RegistryLocation:
  """Parses what `Registry.open` was given (see the module docstring).

  Raises:
    RegistryError: the location is of no supported form.
  """
  if isinstance(location, Mapping):
    extra = set(location) - {"catalog", "store", "compression"}
    if extra or "catalog" not in location:
      raise RegistryError(
          f"registry spec {dict(location)} must have keys 'catalog' (a "
          "local .sqlite path or a postgresql:// URL) and optionally "
          "'store' and 'compression'")
    catalog = str(location["catalog"])
    compression = location.get("compression", compression)
    if catalog.startswith(PG_SCHEMES):
      if "store" in location:
        if "store=" in catalog:
          raise RegistryError(
              "registry spec gives the store twice (in 'store' and in the "
              "catalog URL's store=); give it once")
        sep = "&" if "?" in catalog else "?"
        # A dict store (a kvstore spec) cannot go into a URL: set it after.
        loc = _postgres(catalog + sep + "store=-")
        return dataclasses.replace(loc, store=location["store"],
                                   compression=compression)
      return dataclasses.replace(_postgres(catalog), compression=compression)
    if catalog.startswith("sqlite://"):
      catalog = _sqlite_path(catalog)
    store = location.get("store", os.path.dirname(os.path.abspath(catalog)))
    return RegistryLocation("sqlite", catalog, store,
                            compression=compression)
  text = os.fspath(location)
  if not isinstance(text, str):
    text = os.fsdecode(text)
  if text.startswith(PG_SCHEMES):
    return dataclasses.replace(_postgres(text), compression=compression)
  if text.startswith("sqlite://"):
    base, store = _split_store(text)
    path = _sqlite_path(base)
    if store is None:
      store = os.path.dirname(os.path.abspath(path))
    return RegistryLocation("sqlite", path, store, compression=compression)
  if "://" in text and not text.startswith("file://"):
    raise RegistryError(
        f"{text!r} is a remote store with no catalog; open "
        "'sqlite:///local/catalog.sqlite?store=URL', "
        "'postgresql://host/db?store=URL' or "
        "{'catalog': '/local/catalog.sqlite', 'store': "
        f"'{text}'}} instead (the SQLite catalog must be local)")
  path = text[len("file://"):] if text.startswith("file://") else text
  return RegistryLocation("sqlite", os.path.join(path, "catalog.sqlite"),
                          path, compression=compression)


def _sqlite_path(url: str) -> str:
  """'sqlite:///abs/path' -> '/abs/path' (no query allowed)."""
  parts = urllib.parse.urlsplit(url)
  if parts.netloc not in ("", "localhost") or not parts.path or parts.query:
    raise RegistryError(
        f"{url!r} is not a SQLite catalog URL; expected "
        "sqlite:///absolute/path/catalog.sqlite[?store=URL]")
  return urllib.parse.unquote(parts.path)
