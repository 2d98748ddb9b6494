"""Adapters: spec, host weights, the stacked device bank and the gather-LoRA op."""

from mintjax.adapters.bank import (AdapterBank, bank_from_weights,
                                   bank_logical_axes, bank_shapes, init_bank,
                                   read_slot, write_slot)
from mintjax.adapters.lora_op import lora_delta, lora_project
from mintjax.adapters.spec import (ALL_TARGETS, AdapterError, AdapterInfo,
                                   AdapterSpec, AdapterWeights, BankSpec,
                                   lora_scale)
