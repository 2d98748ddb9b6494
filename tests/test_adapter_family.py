"""The adapter-family seam and the specs (issue 11).

A family that exists only in this file ('fa': LoRA-FA style, a frozen shared
A times a trained per-rank gain, and a trained B) is registered with
`register_family` and runs end to end with no production code changed: bank
specs and adapter specs accept it, the compiled train step trains it
(per-slot optimizer mask included), its bank materialises into the LoRA
factors the op runs, and the store keeps and returns its rows. The specs'
tests pin the stored JSON (registries written before issue 11 must load and
be re-created byte for byte) and that no alpha is ever invented.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mintjax import sharding
from mintjax.adapters import bank as bank_lib
from mintjax.adapters import family as family_lib
from mintjax.adapters.spec import (AdapterError, AdapterInfo, AdapterWeights,
                                   BankSpec)
from mintjax.config import ModelConfig
from mintjax.model import llama
from mintjax.model.base import random_base
from mintjax.store.errors import InvalidAdapterError
from mintjax.store.registry import Registry
from mintjax.store.weights import RowLayout
from mintjax.train import optimizer as opt_lib
from mintjax.train.cohort import cohort_state, init_cohort, read_adapter
from mintjax.train.step import Batch, StepConfig, make_train_step

CFG = ModelConfig(architecture="llama", vocab_size=259, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)
TARGETS = ("q", "down")


# ------------------------------------------------ a family only tests know


def _basis(t: str, num_layers: int, d_in: int, rank: int) -> np.ndarray:
  """Frozen A [L, d_in, rank], prefix-stable in rank (like VeRA's)."""
  rng = np.random.default_rng(sum(map(ord, t)))
  a_rld = rng.uniform(-1, 1, (rank, num_layers, d_in)) / math.sqrt(d_in)
  return np.ascontiguousarray(a_rld.transpose(1, 2, 0), np.float32)


@dataclasses.dataclass(frozen=True)
class FaWeights:
  """gain[t]: [L, r], lora_b[t]: [L, r, d_out]."""

  gain: dict
  lora_b: dict
  rank: int
  alpha: float
  variant = "fa"
  use_rslora = False

  @property
  def targets(self):
    return tuple(t for t in ("q", "k", "v", "o", "gate", "up", "down")
                 if t in self.gain)

  @property
  def scale(self):
    return self.alpha / self.rank

  @property
  def nbytes(self):
    return sum(np.asarray(x).nbytes for d in (self.gain, self.lora_b)
               for x in d.values())

  def validate(self, config, spec=None):
    del config, spec
    return self

  def to_lora(self, config):
    return FAMILY.to_lora(self, {t: (config.num_layers,
                                     *config.projection_shape(t))
                                 for t in self.targets})


@flax.struct.dataclass
class FaBank:
  """gain[t]: [S, L, R], lora_b[t]: [S, L, R, d_out], scale/rank [S], and the
  frozen basis a[t]: [L, d_in, R] riding along untrained."""

  gain: dict
  lora_b: dict
  scale: jax.Array
  rank: jax.Array
  basis: dict

  @property
  def num_slots(self):
    return int(self.scale.shape[0])

  @property
  def max_rank(self):
    return next(iter(self.gain.values())).shape[-1]


class FaFamily(family_lib.AdapterFamily):
  name = "fa"
  tensor_names = ("gain", "lora_b")
  weights_type = FaWeights
  bank_type = FaBank
  supports_rslora = False

  def init(self, config, info, *, user, seed):
    del user, seed
    return FaWeights(
        {t: np.ones((config.num_layers, info.rank), np.float32)
         for t in info.targets},
        {t: np.zeros((config.num_layers, info.rank,
                      config.projection_shape(t)[1]), np.float32)
         for t in info.targets}, info.rank, info.alpha)

  def stored_shapes(self, rank, shape):
    l, _, d_out = shape
    return (l, rank), (l, rank, d_out)

  def tensors(self, weights):
    return weights.gain, weights.lora_b

  def from_tensors(self, info, first, second, meta):
    return FaWeights(dict(first), dict(second), info.rank, info.alpha)

  def to_lora(self, weights, shapes):
    a = {t: _basis(t, *shapes[t][:2], weights.rank) * np.asarray(
        weights.gain[t])[:, None, :] for t in weights.targets}
    return AdapterWeights(a, dict(weights.lora_b), weights.rank,
                          weights.alpha)

  def bank_shapes(self, config, spec):
    s, l, r = spec.num_slots, config.num_layers, spec.max_rank
    f32 = jnp.float32
    return FaBank(
        {t: jax.ShapeDtypeStruct((s, l, r), f32) for t in spec.targets},
        {t: jax.ShapeDtypeStruct((s, l, r, config.projection_shape(t)[1]),
                                 f32) for t in spec.targets},
        jax.ShapeDtypeStruct((s,), f32), jax.ShapeDtypeStruct((s,), jnp.int32),
        {t: jax.ShapeDtypeStruct((l, config.projection_shape(t)[0], r), f32)
         for t in spec.targets})

  def bank_logical_axes(self, spec):
    lora = bank_lib.bank_logical_axes(spec)
    return FaBank({t: ("slot", "layers", "lora_rank") for t in spec.targets},
                  lora.lora_b, ("slot",), ("slot",),
                  {t: lora.lora_a[t][1:] for t in spec.targets})

  def bank_from_weights(self, config, spec, weights):
    host = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                        self.bank_shapes(config, spec))
    for slot, w in weights.items():
      for t in w.targets:
        # Gain past the rank is 1, not 0 (this family's choice), so the
        # padded columns of x A' are not zero: only the per-slot rank mask
        # keeps B's padded rows from training.
        host.gain[t][slot] = 1.0
        host.gain[t][slot, :, :w.rank] = w.gain[t]
        host.lora_b[t][slot, :, :w.rank] = w.lora_b[t]
      host.scale[slot], host.rank[slot] = w.scale, w.rank
    for t in spec.targets:
      host.basis[t][...] = _basis(t, config.num_layers,
                                  config.projection_shape(t)[0], spec.max_rank)
    return jax.tree.map(jnp.asarray, host)

  def read_slot(self, bank, slot, info):
    r = int(bank.rank[slot])
    return FaWeights({t: np.asarray(x[slot, :, :r]) for t, x in
                      bank.gain.items()},
                     {t: np.asarray(x[slot, :, :r]) for t, x in
                      bank.lora_b.items()}, r, info.alpha)

  def trainable(self, bank):
    return {"gain": bank.gain, "lora_b": bank.lora_b}

  def rank_mask(self, bank):
    keep_sr = (jnp.arange(bank.max_rank)[None] < bank.rank[:, None]
               ).astype(jnp.float32)
    return {"gain": {t: keep_sr[:, None, :] for t in bank.gain},
            "lora_b": {t: keep_sr[:, None, :, None] for t in bank.lora_b}}

  def to_lora_bank(self, bank):
    # A' past a slot's rank is not zero (gain 1 there); B's padded rows are,
    # which keeps the product exact.
    basis = jax.lax.stop_gradient(bank.basis)
    a = {t: basis[t][None] * bank.gain[t][:, :, None, :] for t in bank.gain}
    return bank_lib.AdapterBank(a, dict(bank.lora_b), bank.scale, bank.rank)


FAMILY = FaFamily()


@pytest.fixture()
def fa():
  family_lib.register_family(FAMILY)
  yield FAMILY
  family_lib.unregister_family("fa")


@pytest.fixture(scope="module")
def base():
  return random_base(CFG, seed=0)


def _random_fa(rank, seed, alpha=None):
  rng = np.random.default_rng(seed)
  return FaWeights(
      {t: rng.uniform(0.5, 1.5, (2, rank)).astype(np.float32)
       for t in TARGETS},
      {t: (rng.standard_normal((2, rank, CFG.projection_shape(t)[1])) * 0.3
           ).astype(np.float32) for t in TARGETS},
      rank, float(rank if alpha is None else alpha))


# ------------------------------------------------------- the family seam


def test_unknown_family_is_refused_naming_the_known_ones():
  with pytest.raises(AdapterError, match=r"unknown adapter family 'fa'.*"
                     r"'lora', 'vera'.*register_family"):
    BankSpec(variant="fa")
  with pytest.raises(AdapterError, match="unknown adapter family"):
    AdapterInfo(("q",), 2, 2.0, variant="fa")
  assert family_lib.get_family("vera").name == "vera"
  assert BankSpec().family is family_lib.get_family("lora")


def test_a_registered_family_trains_in_the_compiled_step(fa, base):
  spec = BankSpec(targets=TARGETS, max_rank=4, num_slots=5, variant="fa")
  assert spec.family is fa
  step = make_train_step(CFG, spec, opt_lib.OptimizerConfig(
      learning_rate=1e-2), sharding.make_mesh(data=2, fsdp=4),
                         StepConfig(lora_impl="gather"))
  # Slot 2 holds a rank-2 adapter in the rank-4 bank; slot 4 stays empty.
  init = {"u1": _random_fa(4, 1), "u2": _random_fa(2, 2),
          "u3": _random_fa(4, 3)}
  state = cohort_state(CFG, spec, list(init), init)
  bank, opt = state.bank, state.opt
  assert isinstance(bank, FaBank) and set(opt.mu) == {"gain", "lora_b"}
  before = jax.tree.map(np.array, bank)
  rng = np.random.default_rng(0)
  for _ in range(3):
    slots = rng.choice([0, 1, 2], size=8)  # slot 3 never trains
    batch = Batch.from_token_rows(rng.integers(3, 259, (8, 13)), slots)
    bank, opt, _ = step(base.params, bank, opt, batch)
  after = jax.tree.map(np.array, bank)
  for t in TARGETS:
    # Trained leaves moved on trained slots, within their true rank...
    assert not np.array_equal(after.lora_b[t][1], before.lora_b[t][1])
    assert not np.array_equal(after.gain[t][2, :, :2], before.gain[t][2, :, :2])
    # ...the per-slot mask kept rank padding as it was (B's exactly zero)...
    assert np.all(after.gain[t][2, :, 2:] == 1.0)
    assert not np.any(after.lora_b[t][2, :, 2:])
    # ...and untouched slots, the null slot and the frozen basis are
    # bit-identical.
    for k in (0, 3, 4):
      np.testing.assert_array_equal(after.gain[t][k], before.gain[t][k])
      np.testing.assert_array_equal(after.lora_b[t][k], before.lora_b[t][k])
    np.testing.assert_array_equal(after.basis[t], before.basis[t])
  assert int(opt.count[3]) == 0 and int(opt.count[1]) == 3
  # A slot reads back as the family's own weights at its true rank.
  w2 = read_adapter(spec, after, 2, alpha=2.0)
  assert isinstance(w2, FaWeights) and w2.rank == 2


def test_the_bank_materialises_to_the_factors_the_model_runs(fa, base):
  spec = BankSpec(targets=TARGETS, max_rank=4, num_slots=3, variant="fa")
  ws = {1: _random_fa(4, 5), 2: _random_fa(3, 6, alpha=6.0)}
  fa_bank = fa.bank_from_weights(CFG, spec, ws)
  # The jit-side materialisation equals each adapter's host to_lora written
  # into an ordinary LoRA bank, so serving and training agree.
  lora_bank = bank_lib.bank_from_weights(CFG, spec.replace(variant="lora"),
                                         ws)
  got = jax.jit(fa.to_lora_bank)(fa_bank)
  for t in TARGETS:
    for slot, w in ws.items():
      np.testing.assert_allclose(got.lora_a[t][slot, ..., :w.rank],
                                 lora_bank.lora_a[t][slot, ..., :w.rank],
                                 atol=1e-6)
    np.testing.assert_array_equal(got.lora_b[t], lora_bank.lora_b[t])
  np.testing.assert_allclose(got.scale, [0.0, 1.0, 2.0])
  tokens = np.random.default_rng(0).integers(3, 259, (3, 7)).astype(np.int32)
  idx = np.array([0, 1, 2], np.int32)
  y_fa = llama.jit_forward(base.params, got, idx, tokens, config=CFG)
  y_lora = llama.jit_forward(base.params, lora_bank, idx, tokens, config=CFG)
  np.testing.assert_allclose(y_fa, y_lora, atol=1e-4)
  # A fresh adapter of the family (its init, through the cohort code) is
  # exactly the base model.
  fresh = init_cohort(CFG, spec, ["new"], alpha=4.0)["new"]
  assert isinstance(fresh, FaWeights) and fresh.alpha == 4.0
  same = np.repeat(tokens[:1], 2, axis=0)
  y0 = llama.jit_forward(
      base.params, fa.to_lora_bank(fa.bank_from_weights(CFG, spec,
                                                        {1: fresh})),
      idx[:2], same, config=CFG)
  np.testing.assert_array_equal(y0[1], y0[0])


def test_the_store_keeps_a_registered_family(fa, tmp_path):
  reg = Registry.open(tmp_path / "reg")
  spec = BankSpec(targets=TARGETS, max_rank=3, variant="fa")
  info = AdapterInfo.for_bank(spec, alpha=3.0)
  # Its rows hold no d_in (shapes_of is None): the shapes come at creation.
  reg.create_adapter("f", spec=info, base_fingerprint="sha256:ab",
                     config=CFG)
  w = _random_fa(3, 7)
  rev = reg.publish("f", w)
  rec = reg.adapter("f")
  (_, got), = reg.load_many(["f"])
  assert isinstance(got, FaWeights)
  for t in TARGETS:
    np.testing.assert_array_equal(got.gain[t], w.gain[t])
    np.testing.assert_array_equal(got.lora_b[t], w.lora_b[t])
  assert rec["layout"]["variant"] == "fa"  # its own shape class
  assert spec.stored_bytes(CFG) == 4 * sum(2 * (3 + 3 * CFG.projection_shape(
      t)[1]) for t in TARGETS)
  assert rev.revision == 1 and reg.verify()["ok"]
  with pytest.raises(InvalidAdapterError, match="must be FaWeights"):
    reg.publish("f", AdapterWeights.random(CFG, TARGETS, 3, alpha=3.0))


# -------------------------------------------------------------- the specs

# Spec dicts exactly as registries before issue 11 stored them
# (`AdapterInfo.to_dict()` of the store's identity module then).
OLD_LORA = {"alpha": 8.0, "dtype": "float32", "rank": 4,
            "targets": ["q", "v"], "use_rslora": False, "variant": "lora"}
OLD_VERA = {"alpha": 4.0, "basis_seed": 7, "dtype": "float32", "rank": 4,
            "targets": ["q", "v"], "use_rslora": False, "variant": "vera"}


def test_old_stored_spec_dicts_parse_and_round_trip_byte_for_byte():
  for old in (OLD_LORA, OLD_VERA):
    info = AdapterInfo.from_dict(old)
    assert info.to_dict() == old
    assert json.dumps(info.to_dict(), sort_keys=True) == json.dumps(
        old, sort_keys=True)
  assert AdapterInfo.from_dict(OLD_VERA).family.name == "vera"
  assert AdapterInfo.from_dict(OLD_LORA).basis_seed is None


def test_a_registry_stores_the_old_json_and_recreates_from_it(tmp_path):
  reg = Registry.open(tmp_path / "reg")
  reg.create_adapter("l", spec=OLD_LORA, base_fingerprint="sha256:ab",
                     config=CFG)
  reg.create_adapter("v", spec=OLD_VERA, base_fingerprint="sha256:ab",
                     config=CFG)
  for aid, old in (("l", OLD_LORA), ("v", OLD_VERA)):
    rec = reg.adapter(aid)
    assert rec["spec_json"] == json.dumps(old, sort_keys=True)
    # exist_ok compares specs, so the typed spec matches the stored dict.
    assert reg.create_adapter(aid, spec=AdapterInfo.from_dict(old),
                              base_fingerprint="sha256:ab", exist_ok=True,
                              config=CFG)["id"] == aid


def test_no_alpha_is_invented_from_a_bank_spec(tmp_path):
  reg = Registry.open(tmp_path / "reg")
  with pytest.raises(InvalidAdapterError, match="for_bank"):
    reg.create_adapter("x", spec=BankSpec(), base_fingerprint="sha256:ab")
  with pytest.raises(TypeError):
    AdapterInfo.for_bank(BankSpec())  # alpha is keyword-required
  info = AdapterInfo.for_bank(BankSpec(max_rank=4, variant="vera",
                                       basis_seed=3), alpha=2.0)
  assert (info.rank, info.alpha, info.basis_seed, info.scale) == (4, 2.0, 3,
                                                                   0.5)
  assert AdapterInfo.for_bank(BankSpec(), alpha=1.0).basis_seed is None


def test_num_slots_counts_the_null_slot_and_converts_in_one_place():
  spec = BankSpec.for_adapters(7, targets=("q",), max_rank=2)
  assert spec.num_slots == 8
  with pytest.raises(AdapterError, match="at least one adapter"):
    BankSpec.for_adapters(0)
  with pytest.raises(AdapterError, match="null adapter"):
    BankSpec(num_slots=1)


def test_row_layout_is_derived_from_the_adapter_spec():
  shapes = {t: (CFG.num_layers, *CFG.projection_shape(t)) for t in ("q", "v")}
  for old, per_target in ((OLD_LORA, lambda d_in, d_out: 4 * (d_in + d_out)),
                          (OLD_VERA, lambda d_in, d_out: 4 + d_out)):
    info = AdapterInfo.from_dict(old)
    layout = RowLayout.for_info(info, shapes)
    assert layout.names == info.family.tensor_names
    assert layout.row_len == CFG.num_layers * sum(
        per_target(*CFG.projection_shape(t)) for t in ("q", "v"))
    assert layout.row_len == BankSpec(
        targets=info.targets, max_rank=4, variant=info.variant
    ).params_per_adapter(CFG)


# ------------------------------------------- no family branches elsewhere

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The modules allowed to know family names: the families and their registry.
_FAMILY_MODULES = {"mintjax/adapters/family.py", "mintjax/adapters/lora.py",
                   "mintjax/adapters/vera.py"}


def _family_branches(path: str) -> list[str]:
  """`<x>.variant ==/!= '<name>'` and `isinstance(_, Vera...)` in a file."""
  with open(os.path.join(_ROOT, path), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      sides = [node.left, *node.comparators]
      named = any(isinstance(s, (ast.Attribute, ast.Name)) and (
          getattr(s, "attr", None) or getattr(s, "id", "")) == "variant"
                  for s in sides)
      literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str)
                    for s in sides)
      if named and literal:
        found.append(f"{path}:{node.lineno}")
    if (isinstance(node, ast.Call) and getattr(node.func, "id", "") ==
        "isinstance" and len(node.args) == 2 and
        "Vera" in ast.unparse(node.args[1])):
      found.append(f"{path}:{node.lineno}")
  return found


def test_no_family_branches_outside_the_family_modules():
  found = []
  for top in ("mintjax", "tools"):
    for d, _, names in os.walk(os.path.join(_ROOT, top)):
      for n in names:
        rel = os.path.relpath(os.path.join(d, n), _ROOT)
        if n.endswith(".py") and rel not in _FAMILY_MODULES:
          found += _family_branches(rel)
  assert not found, (
      f"adapter-family branches outside the family modules: {found}; ask "
      "the family (spec.family / get_family) instead")
