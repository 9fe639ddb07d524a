"""Scale groups given by a per-input-channel group index (GPTQ's ``g_idx``) as contiguous groups.

GPTQ with act-order (``desc_act``) quantizes input channels in a permuted order, so group ``g`` holds the
channels ``{i : g_idx[i] = g}``, which are scattered in the stored (original) order. jquant's integer formats
hold contiguous groups along the input axis; ``contiguous_groups`` finds the largest group size ``G``
dividing ``in`` such that every block of ``G`` consecutive channels has one group index, and repeats each
group's scale (and zero point) for its blocks. Dequantization is then unchanged, exactly:
``W[i, o] = (q[i, o] - z[g_idx[i], o]) s[g_idx[i], o]``. Without act-order (``g_idx[i] = i // group``) ``G`` is
the group size; with a scattered order it can be as small as 1 (one scale per weight), which stores more
scale bytes than the checkpoint but keeps every weight.
"""

from __future__ import annotations

import numpy as np


def contiguous_groups(g_idx: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None
                      ) -> tuple[int, np.ndarray, np.ndarray | None]:
    """``(G, scales [in / G, out], zeros [in / G, out] | None)`` from ``g_idx [in]`` and per-group
    ``scales`` / ``zeros`` ``[groups, out]``."""
    g_idx = np.asarray(g_idx, np.int64)
    n = g_idx.shape[0]
    if g_idx.min(initial=0) < 0 or g_idx.max(initial=0) >= scales.shape[0]:
        raise ValueError(f"g_idx holds group indices in [{g_idx.min()}, {g_idx.max()}], but there are "
                         f"{scales.shape[0]} scale rows.")
    for size in sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True):
        blocks = g_idx.reshape(-1, size)
        if (blocks == blocks[:, :1]).all():
            first = blocks[:, 0]
            return size, scales[first], None if zeros is None else zeros[first]
    raise AssertionError("unreachable: blocks of one channel always share their group index")
