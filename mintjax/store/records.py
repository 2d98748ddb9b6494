"""Catalog records decoded: an adapter's spec and row layout, cached.

Owns `adapter_record` (look up an adapter or raise the error that says how
to create one) and the JSON -> `AdapterInfo` / `RowLayout` decoders shared
by the publisher, the loader and the lifecycle code. Many adapters share
one spec, so decoding is cached by the JSON text.
"""

from __future__ import annotations

import functools
import json

from mintjax.store.catalog import Catalog
from mintjax.store.errors import UnknownRefError
from mintjax.store.identity import AdapterInfo, check_name, parse_info
from mintjax.store.weights import RowLayout


def adapter_record(catalog: Catalog, adapter_id) -> dict:
  """The adapter's catalog record; raises if the id is invalid or unknown."""
  check_name(adapter_id)
  rec = catalog.adapter(adapter_id)
  if rec is None:
    raise UnknownRefError(
        f"unknown adapter {adapter_id!r}; create it with create_adapter() "
        "or list adapters with `python -m tools.mint list`")
  return rec


@functools.lru_cache(maxsize=256)
def info_json(spec_json: str) -> AdapterInfo:
  return parse_info(json.loads(spec_json))


@functools.lru_cache(maxsize=256)
def layout_json(layout_json_text: str) -> RowLayout:
  return RowLayout.from_dict(json.loads(layout_json_text))


def info_of(rec: dict) -> AdapterInfo:
  return info_json(rec["spec_json"])


def layout_of(rec: dict) -> RowLayout:
  return layout_json(rec["layout_json"])
