"""Pallas kernels (imported as ``jquant.pallas_kernels``); each file holds one kernel and its pure-jnp reference."""
