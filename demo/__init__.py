"""Tiny models and worlds that the demo and the tests build for themselves (no hub downloads)."""
