"""Numerical building blocks with no jquant dependency: the bottom of the import graph.

``hadamard`` (Hadamard matrices of every order jquant constructs, the fast Walsh–Hadamard transform,
random Hadamard / orthogonal matrices) and ``kmeans`` (the one weighted k-means). Formats, ops,
transforms, algorithms and KV methods import them; they import nothing from jquant.
"""
