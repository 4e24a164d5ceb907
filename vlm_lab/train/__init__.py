"""Training: `fit()` (AdamW, warmup + cosine, gradient accumulation incl. open_clip's exact contrastive feature
caching, autocast, clipping, exact resume from safetensors checkpoints, DDP under torchrun), its `TrainConfig`,
callbacks for notebooks (`LivePlot`, `PrintLogger`), `checkpoint` and `distributed` helpers.

    from vlm_lab.train import TrainConfig, fit, LivePlot
    result = fit(model, dataset, TrainConfig(steps=300, batch_size=64, collate_fn=collate), callbacks=[LivePlot()])
"""

from vlm_lab.train import distributed
from vlm_lab.train.checkpoint import latest_checkpoint, load_checkpoint, load_model, save_checkpoint
from vlm_lab.train.config import TrainConfig
from vlm_lab.train.fit import (Callback, FitResult, LivePlot, PrintLogger, TrainState, fit, lr_factor,
                               param_groups, seed_everything)

__all__ = ["TrainConfig", "fit", "FitResult", "TrainState", "Callback", "PrintLogger", "LivePlot", "lr_factor",
           "param_groups", "seed_everything", "save_checkpoint", "load_checkpoint", "load_model",
           "latest_checkpoint", "distributed"]
