"""The registry test suite again, on the PostgreSQL catalog.

Every test of tests/test_registry.py and tests/test_store_durability.py is
collected here a second time, with `Registry.open` of a local directory
(or of a {'catalog': '.../x.sqlite', ...} dict) routed to a real PostgreSQL
server (the session's `postgres_server`): a fresh schema per directory, the
weights still in that directory. The same assertions then hold on both
backends; the tests that are about SQLite files themselves are listed in
`SQLITE_ONLY` with the reason, and their PostgreSQL counterparts (schema
version refusal, driver errors as CatalogError) are at the bottom.
"""

from __future__ import annotations

import hashlib
import os
from typing import Mapping

import pytest

import test_registry
import test_store_durability
from mintjax.store.errors import CatalogError, RegistryError
from mintjax.store.postgres_catalog import PostgresCatalog
from mintjax.store.registry import Registry

SQLITE_ONLY = {
    "test_old_schema_catalog_is_refused_unchanged":
        "plants old SQLite files (PostgreSQL: test_pg_old_schema_...)",
    "test_verify_lists_every_bad_ref_and_loads_check_crc":
        "reopens the registry by its catalog file's directory",
    "test_catalog_errors_are_registry_errors":
        "holds SQLite's file lock (PostgreSQL: test_pg_driver_errors_...)",
}

_open = Registry.open.__func__
_BACKEND_TESTS = {}
for _module in (test_registry, test_store_durability):
  for _name in dir(_module):
    _obj = getattr(_module, _name)
    if _name.startswith("test_") and callable(_obj):
      if _name in SQLITE_ONLY:
        continue
      _BACKEND_TESTS[_name] = _obj
    elif _name == "reg":  # test_registry's fixture (it calls Registry.open).
      globals()["reg"] = _obj
globals().update(_BACKEND_TESTS)


def _schema_for(path: str) -> str:
  return "t" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:20]


@pytest.fixture(autouse=True)
def _catalog_on_postgres(postgres_server, monkeypatch):
  """Registry.open(local dir or sqlite dict) -> the same registry with its
  catalog in PostgreSQL (one schema per directory, so reopening a
  directory reopens the same registry)."""

  def open_on_postgres(cls, location, *args, **kwargs):
    if isinstance(location, Mapping):
      cat = str(location.get("catalog", ""))
      if cat.endswith(".sqlite"):
        location = dict(location, catalog=postgres_server.url +
                        f"?schema={_schema_for(cat)}")
        location.setdefault("store", os.path.dirname(os.path.abspath(cat)))
    elif "://" not in os.fspath(location):
      path = os.path.abspath(os.fspath(location))
      location = postgres_server.registry_url(path, _schema_for(path))
    return _open(cls, location, *args, **kwargs)

  monkeypatch.setattr(Registry, "open", classmethod(open_on_postgres))


def test_suite_really_runs_on_postgres(tmp_path):
  reg = Registry.open(str(tmp_path / "r"))
  assert isinstance(reg.catalog, PostgresCatalog)
  assert reg.catalog.schema == _schema_for(str(tmp_path / "r"))
  assert len(_BACKEND_TESTS) >= 20, sorted(_BACKEND_TESTS)


def test_pg_old_schema_version_is_refused_unchanged(postgres_server,
                                                    tmp_path):
  url = postgres_server.registry_url(str(tmp_path), "old_schema")
  reg = Registry.open(url)
  reg.catalog.query("UPDATE meta SET value='2' WHERE key='schema_version'"
                    " RETURNING 1")
  with pytest.raises(CatalogError, match="schema version 2.*export-peft"):
    Registry.open(url)
  (version,), = reg.catalog.query("SELECT value FROM meta")
  assert version == "2"


def test_pg_missing_registry_and_bad_urls_are_clear(postgres_server,
                                                    tmp_path):
  with pytest.raises(RegistryError, match="no tables in schema nothere"):
    Registry.open(postgres_server.registry_url(str(tmp_path), "nothere"),
                  create=False)
  with pytest.raises(RegistryError, match="names no weights store"):
    Registry.open(postgres_server.url + "?schema=x")
  with pytest.raises(RegistryError, match="not starting with a digit or"):
    Registry.open(postgres_server.url + "?schema=pg_x&store=/tmp/x")
  with pytest.raises(RegistryError, match="schema='Bad-Name'"):
    Registry.open(postgres_server.url + "?schema=Bad-Name&store=/tmp/x")


def test_pg_driver_errors_are_catalog_errors(postgres_server, tmp_path):
  port = postgres_server.port + 1 if postgres_server.port < 65535 else 1024
  with pytest.raises(CatalogError, match="cannot open catalog.*server is up"):
    Registry.open(f"postgresql://mint:secret@127.0.0.1:{port}/mint"
                  f"?store={tmp_path}")
  try:
    Registry.open(f"postgresql://mint:secret@127.0.0.1:{port}/mint"
                  f"?store={tmp_path}")
  except CatalogError as e:
    assert "secret" not in str(e)  # The password never reaches a message.
  reg = Registry.open(postgres_server.registry_url(str(tmp_path)))
  with pytest.raises(CatalogError, match="UndefinedTable"):
    reg.catalog.query("SELECT * FROM no_such_table")
  assert reg.catalog.counts()["adapters"] == 0  # The connection still works.
