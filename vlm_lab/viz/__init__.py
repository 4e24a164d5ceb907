"""Figures (matplotlib ``Figure`` objects, never ``plt.show()``): similarity matrices, image grids, loss curves."""

from .similarity import image_grid, loss_curve, similarity_matrix

__all__ = ["similarity_matrix", "image_grid", "loss_curve"]

# chapter 01: attention maps, embedding maps, the taxonomy chart
from .attention import attention_rollout, overlay_attention, plot_word_attention  # noqa: E402
from .embedding import embedding_map, project_2d, thumbnail_grid  # noqa: E402
from .taxonomy import alignment_figure, fusion_styles_figure, plot_taxonomy, plot_taxonomy_bars  # noqa: E402

__all__ += ["attention_rollout", "overlay_attention", "plot_word_attention", "embedding_map", "project_2d",
            "thumbnail_grid", "alignment_figure", "fusion_styles_figure", "plot_taxonomy", "plot_taxonomy_bars"]
