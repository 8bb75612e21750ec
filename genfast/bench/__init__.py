"""genfast.bench: benchmarks of genfast's ops against their baselines (PyTorch eager reference,
``torch.compile`` of the reference), run by ``python -m genfast bench [OPS] [--quick]``.

  timing.py   device-agnostic timing (CUDA events / wall clock), copy bandwidth, and the
              generic ``Case``/``Provider`` structure with its runner
  bias_act.py the bias_act cases
  report.py   text table, CSV/JSON, PNG plot
  cli.py      the command line; ``OPS`` is the registry of op suites
"""
