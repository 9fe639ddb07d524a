"""Helpers for parity checks against reference implementations (need the `test` extra: torch, transformers)."""
