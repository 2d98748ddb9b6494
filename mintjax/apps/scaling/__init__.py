"""The scaling study (Scale Down, Up and Out) behind `tools/scaling.py`.

  adapters  train many adapter shapes on one personal workload (Down, Up).
  out       many adapters served, stored and trained together (Out).
  report    the JSON results, plots and docs/SCALING.md sections.
"""
