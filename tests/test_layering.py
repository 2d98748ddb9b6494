"""Dependencies point down: the package layers of mintjax, checked by `ast`.

Every module under mintjax/ and pallas_kernels/ is parsed (nothing is
imported), every import in it is collected, module-level and inside
functions alike, and mapped to the package it names. The test fails on

  - an edge the `ALLOWED` table does not list (an upward or sideways import,
    or a library module importing configs/, tools/ or launch/),
  - a cycle between modules, even one hidden behind a function-level import
    (imports under `if TYPE_CHECKING:` never run, so they form no cycle;
    they must still point down),
  - a function-level import of a mintjax or pallas_kernels module other than
    the explicit `LAZY_ALLOWED` ones (such imports mostly dodge cycles),
  - a package that is not in the table yet (place it before it lands).

The same table is drawn in docs/ARCHITECTURE.md ("Package layers").
"""

from __future__ import annotations

import ast
import dataclasses
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("mintjax", "pallas_kernels", "cpu_kernels")
PROJECT = ("mintjax", "pallas_kernels", "cpu_kernels", "configs", "tools",
           "launch")

# The native CPU ops sit beside the kernels at the bottom; the layers that
# hold the model's math may call them.
_BASE = frozenset({"mintjax", "mintjax.config", "mintjax.sharding",
                   "mintjax.progress", "cpu_kernels"})
_MODEL = _BASE | {"mintjax.adapters", "mintjax.model"}
_LIBRARY = _MODEL | {"mintjax.store", "mintjax.train", "mintjax.serve",
                     "mintjax.eval", "mintjax.aot", "mintjax.scale_up"}

# package -> the packages it may import (low -> high). configs/, tools/ and
# launch/ sit above everything here: no package below may import them.
ALLOWED: dict[str, frozenset[str]] = {
    # The kernels are the bottom layer: they import nothing from mintjax.
    "pallas_kernels": frozenset(),
    # The native XLA:CPU ops (AMX matmul, decode attention, SwiGLU): jax
    # and their own build only.
    "cpu_kernels": frozenset(),
    "mintjax": frozenset(),             # the package root: a version string
    "mintjax.config": frozenset({"mintjax"}),
    "mintjax.sharding": frozenset({"mintjax"}),  # mesh + logical-axis rules
    "mintjax.progress": frozenset(),    # progress bars (tqdm only)
    # The adapter spec, bank and the gather-LoRA op. The op reaches the
    # kernels only through `LAZY_ALLOWED` below, not through this table.
    "mintjax.adapters": _BASE,
    # The functional model, its loaders and base checkpoints.
    "mintjax.model": _BASE | {"mintjax.adapters"},
    # The adapter store sits under training and serving.
    "mintjax.store": _MODEL,
    "mintjax.train": _MODEL | {"mintjax.store"},
    "mintjax.serve": _MODEL | {"mintjax.store"},   # never imports train
    # Evaluation runs trained adapters through the model (train's data and
    # loss; serve for generation).
    "mintjax.eval": _MODEL | {"mintjax.store", "mintjax.train",
                              "mintjax.serve"},
    # Ahead-of-time compiles of the train and serve steps, and the scale-up
    # plan built on them.
    "mintjax.aot": _MODEL | {"mintjax.store", "mintjax.train",
                             "mintjax.serve"},
    "mintjax.scale_up": _MODEL | {"mintjax.store", "mintjax.train",
                                  "mintjax.serve", "mintjax.aot"},
    # Applications (demo, scaling study, training workflow, JSONL and HTTP
    # serving) use the whole library; nothing in the library imports them.
    "mintjax.apps": _LIBRARY,
}

# (importing module, imported module) -> why a function-level import is
# right there. Anything else imported inside a function fails the test.
# (The op finds its kernels by name through importlib, so even that needs no
# function-level import statement; the table is kept for the rare honest
# case, e.g. an optional heavy dependency.)
LAZY_ALLOWED: dict[tuple[str, str], str] = {}

# Module-level edges allowed across a package boundary the table forbids.
EXACT_ALLOWED: dict[tuple[str, str], str] = {
    # The op's oracle is the kernels' token-level oracle over [B, T]: one
    # definition of the math. pallas_kernels.reference imports only jax.
    ("mintjax.adapters.lora_op", "pallas_kernels.reference"):
        "the op and the kernels share one oracle",
}


@dataclasses.dataclass(frozen=True)
class Edge:
  src: str        # importing module, e.g. 'mintjax.serve.engine'
  dst: str        # imported module (or package), e.g. 'mintjax.model.llama'
  lazy: bool      # the import statement is inside a function
  where: str      # 'path:line' for the failure message
  type_only: bool = False  # under `if TYPE_CHECKING:` (never executed)


def package_of(module: str) -> str:
  """'mintjax.serve.engine' -> 'mintjax.serve'; 'pallas_kernels.ops' ->
  'pallas_kernels'; 'configs.serve' -> 'configs'."""
  parts = module.split(".")
  if parts[0] == "mintjax" and len(parts) > 1:
    return "mintjax." + parts[1]
  return parts[0]


def _modules(root: str) -> dict[str, str]:
  """Dotted module name -> file path for every .py file under SCANNED."""
  out = {}
  for top in SCANNED:
    for dirpath, _, files in os.walk(os.path.join(root, top)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(dirpath, f)
          mod = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
          out[mod[:-len(".__init__")] if mod.endswith(".__init__")
              else mod] = path
  return out


def _inside_functions(tree: ast.AST) -> set[int]:
  ids = set()
  for fn in ast.walk(tree):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      ids.update(id(n) for n in ast.walk(fn) if n is not fn)
  return ids


def _type_checking_only(tree: ast.AST) -> set[int]:
  """Nodes in the body of `if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:`."""
  ids = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute)
            and node.test.attr == "TYPE_CHECKING")):
      for stmt in node.body:
        ids.update(id(n) for n in ast.walk(stmt))
  return ids


def import_edges(root: str = ROOT) -> tuple[list[Edge], set[str]]:
  """Every project import in every scanned module, and the module names."""
  modules = _modules(root)
  edges = []
  for mod, path in sorted(modules.items()):
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    lazy_ids = _inside_functions(tree)
    type_ids = _type_checking_only(tree)
    is_pkg = path.endswith("__init__.py")
    for node in ast.walk(tree):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
          pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
          pkg = pkg[:len(pkg) - (node.level - 1)]
          base = ".".join(pkg + ([base] if base else []))
        # `from pkg import mod` names the module; `from mod import name`
        # names mod.
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules
                   else base for a in node.names]
      for t in targets:
        if t.split(".")[0] in PROJECT:
          edges.append(Edge(mod, t, id(node) in lazy_ids,
                            f"{os.path.relpath(path, root)}:{node.lineno}",
                            type_only=id(node) in type_ids))
  return edges, set(modules)


def layer_violations(edges: list[Edge]) -> list[str]:
  """Edges the ALLOWED table forbids (EXACT_ALLOWED ones excepted)."""
  bad = []
  for e in edges:
    src, dst = package_of(e.src), package_of(e.dst)
    if src == dst or (e.src, e.dst) in EXACT_ALLOWED:
      continue
    if e.lazy and (e.src, e.dst) in LAZY_ALLOWED:
      continue
    if src not in ALLOWED:
      bad.append(f"{e.where}: package {src} is not in tests/test_layering.py"
                 " ALLOWED; add it to the table (and docs/ARCHITECTURE.md)")
    elif dst not in ALLOWED.get(src, ()):
      bad.append(f"{e.where}: {e.src} imports {e.dst}, but {src} may import "
                 f"only {sorted(ALLOWED[src]) or 'nothing from mintjax'}; "
                 "move the code down a layer or the caller up")
  return bad


def lazy_violations(edges: list[Edge]) -> list[str]:
  return [f"{e.where}: {e.src} imports {e.dst} inside a function; import it "
          "at the top (a cycle it dodges is a layering bug)"
          for e in edges if e.lazy and (e.src, e.dst) not in LAZY_ALLOWED]


def module_cycles(edges: list[Edge], modules: set[str]) -> list[list[str]]:
  """Strongly connected groups of >1 module (Tarjan), function-level
  imports included; a package's __init__ counts as a module."""
  graph = {m: set() for m in modules}
  for e in edges:
    if e.dst in modules and e.dst != e.src and not e.type_only:
      graph[e.src].add(e.dst)
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        group.append(w)
        if w == v:
          break
      if len(group) > 1:
        out.append(sorted(group))

  for m in sorted(graph):
    if m not in index:
      visit(m)
  return out


def package_cycles(table: dict[str, frozenset[str]]) -> list[str]:
  """Packages that can reach themselves through the table (none may)."""
  bad = []
  for start in table:
    seen, todo = set(), list(table[start])
    while todo:
      p = todo.pop()
      if p == start:
        bad.append(start)
        break
      if p not in seen:
        seen.add(p)
        todo.extend(table.get(p, ()))
  return bad


@pytest.fixture(scope="module")
def graph():
  return import_edges(ROOT)


def test_the_table_itself_has_no_cycles():
  assert package_cycles(ALLOWED) == []


def test_no_upward_or_sideways_imports(graph):
  edges, _ = graph
  bad = layer_violations(edges)
  assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules(graph):
  edges, modules = graph
  cycles = module_cycles(edges, modules)
  assert not cycles, f"import cycles: {cycles}"


def test_no_function_level_imports_of_project_modules(graph):
  edges, _ = graph
  bad = lazy_violations(edges)
  assert not bad, "\n".join(bad)


def test_allowed_exceptions_are_still_needed(graph):
  edges, _ = graph
  present = {(e.src, e.dst) for e in edges}
  stale = sorted((set(EXACT_ALLOWED) | set(LAZY_ALLOWED)) - present)
  assert not stale, (f"{stale} no longer exist; remove them from "
                     "EXACT_ALLOWED / LAZY_ALLOWED in tests/test_layering.py")


def _write(root, rel, text):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def test_a_planted_upward_import_and_cycle_are_caught(tmp_path):
  root = str(tmp_path)
  _write(root, "mintjax/__init__.py", "")
  _write(root, "mintjax/serve/__init__.py", "")
  _write(root, "mintjax/serve/engine.py", "from mintjax.store import loader\n")
  _write(root, "mintjax/store/__init__.py", "")
  # store -> serve is upward; the lazy import also closes a cycle.
  _write(root, "mintjax/store/loader.py",
         "def f():\n  from mintjax.serve import engine\n  return engine\n")
  _write(root, "mintjax/model/__init__.py", "")
  _write(root, "mintjax/model/llama.py",
         "import configs.serve\nfrom mintjax.model import base\n")
  # Type-only imports never run: base <-> llama is no cycle, but an upward
  # type-only import is still caught.
  _write(root, "mintjax/model/base.py",
         "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
         "  from mintjax.model import llama\n"
         "  from mintjax.serve import engine\n")
  edges, modules = import_edges(root)
  layer = layer_violations(edges)
  assert any("mintjax.store.loader imports mintjax.serve.engine" in b
             for b in layer), layer
  assert any("mintjax.model.llama imports configs.serve" in b for b in layer)
  assert any("mintjax.model.base imports mintjax.serve.engine" in b
             for b in layer), layer
  assert len(layer) == 3, layer  # serve -> store is allowed
  assert module_cycles(edges, modules) == [
      ["mintjax.serve.engine", "mintjax.store.loader"]]
  assert len(lazy_violations(edges)) == 1
  assert package_cycles({"a": frozenset({"b"}), "b": frozenset({"a"})}) == [
      "a", "b"]
