"""Precision allocation: which format each weight gets under a budget.

``allocation`` (MxMoE's schemes, analytic kernel-time model and per-layer MILP / λ-sweep solver; numpy and
scipy only) and ``mxmoe`` (per-block sensitivity Δ, per-layer allocation over a model, and the resulting
mixed-precision recipe, which ``jquant.quantize`` runs like any other).
"""
