"""Dynamic latent frame rate for video generation: DLFR-VAE (spec ``dlfr_vae.md``) and VGDFR (spec ``vgdfr.md``).

- ``similarity``: ``neighbour_ssim`` (SSIM of frames ``d`` apart) and ``content_complexity`` (mean ``1 - SSIM``).
"""

from jquant.frame_rate.similarity import content_complexity, neighbour_ssim

__all__ = ["content_complexity", "neighbour_ssim"]
