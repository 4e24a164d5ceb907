"""Draw the chapter-01 taxonomy diagrams into assets/ (PNG):

    MPLBACKEND=Agg .venv/bin/python assets/make_figures.py

fusion_styles.png   early / intermediate / late fusion block diagrams   (vlm_lab.viz.taxonomy.fusion_styles_figure)
alignment.png       cross-modal attention vs joint embedding space      (vlm_lab.viz.taxonomy.alignment_figure)
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from vlm_lab.viz.taxonomy import alignment_figure, fusion_styles_figure  # noqa: E402

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    for name, make in (("fusion_styles.png", fusion_styles_figure), ("alignment.png", alignment_figure)):
        fig = make()
        fig.savefig(HERE / name, dpi=110, metadata={"Software": None})
        print("wrote", HERE / name)
