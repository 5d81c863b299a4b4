"""Compression: weight-only quantisation (RTN, GPTQ), pruning, and the compare report. A capability package: it
imports the core (model, infer, interop, train); the core never imports it. What every verb must LOAD (the
quantised linear layer) lives in model/quant.py."""
