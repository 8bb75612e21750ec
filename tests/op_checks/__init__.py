"""Checks shared by an op's CPU/Triton tests and its CUDA-emulation tests (one module per op
family, ``from op_checks import bias_act as checks``). Test modules import these and
tests/helpers.py, never each other."""
