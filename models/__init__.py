"""Flax NNX model families (imported as ``jquant.models``)."""
