"""genfast.bench: benchmarks of genfast's ops against their baselines (PyTorch eager reference,
``torch.compile`` of the reference), run by ``python -m genfast bench [OPS] [--quick]``.

  timing.py   device-agnostic timing (CUDA events / wall clock), copy bandwidth, and the
              generic ``Case``/``Provider`` structure with its runner
  providers.py what the op suites share: the provider table (genfast backends, eager,
              compile), why a provider cannot run, thunks, the torch.compile baseline
  bias_act.py, group_norm.py, ... one op suite each: its cases (inputs, calls, sizes)
  report.py   text table, CSV/JSON, PNG plot
  cli.py      the command line; ``OPS`` is the registry of op suites
"""
