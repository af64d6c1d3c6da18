"""Sweeps: one config, a grid of `key=v1,v2` values, every combination (or the zipped pairs) trained
as its own run under one folder, resumable after a kill (`spec.py` plans, `runner.py` runs)."""
