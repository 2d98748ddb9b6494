"""Persistent adapter state: the registry (catalog) and its weights store.

`mintjax.store.registry.Registry` is the entry point; `catalog` holds the
SQLite metadata, `weights` the tensorstore arrays, `peft_io` the Hugging Face
PEFT import/export, `errors` the exceptions.
"""
