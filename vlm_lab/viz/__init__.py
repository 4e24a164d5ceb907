"""Figures (matplotlib ``Figure`` objects, never ``plt.show()``): similarity matrices, image grids, loss curves."""

from .similarity import image_grid, loss_curve, similarity_matrix

__all__ = ["similarity_matrix", "image_grid", "loss_curve"]
