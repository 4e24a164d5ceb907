"""ViLT: Vision-and-Language Transformer Without Convolution or Region Supervision (Kim et al., ICML 2021).

The whole visual pipeline of earlier vision-language models (a CNN, often an object detector) is replaced
by ViT's linear patch projection; one transformer fuses both modalities from the first layer (the paper's
Figure 3)::

    t  = BERTEmbed(words) + type_0                               (b, m, d)   word + position (+ LayerNorm)
    v  = [v_cls; patches(I) W] + E_pos + type_1                  (b, 1 + n, d)  no CNN, no detector
    z  = Transformer([t; v], mask = [text mask; patch mask])     pre-LN ViT blocks, then a final LayerNorm
    p  = tanh(W_pool z[:, 0])                                    pooled = the *text* [CLS]
    ITM: Linear(p) -> 2      MLM: BERT head on text tokens      WPA: OT distance words <-> patches

Matches the reference ``dandelin/ViLT`` (``vilt/modules/vilt_module.py``, ``vision_transformer.py``,
``objectives.py``) and Hugging Face ``modeling_vilt.py``: ``ViLT.from_hf`` loads a transformers
``ViltModel`` / ``ViltForMaskedLM`` / ``ViltForImageAndTextRetrieval`` with the same outputs
(``tests/test_vilt.py``, transformers 5.25). Choices, written down:

- **image embedding** (``visual_embed``) follows the reference: a ``pixel_mask`` ``(b, H, W)`` (1 = real
  pixel; default all ones) is resized to the patch grid with nearest-neighbour interpolation, the position
  table is resized bilinearly (``align_corners=True``) to each image's valid h x w and zero-padded, and the
  patches are then *sampled*: with ``max_image_len = K > 0`` K valid patches are drawn without replacement
  (padding patches fill up when an image has fewer), their positions and ``patch_index`` move with them;
  with ``max_image_len = -1`` all valid patches are kept. Sampling happens only in training mode; in eval
  mode patches keep their raster order (the reference also shuffles at -1 and in eval, which changes
  nothing since attention is permutation-equivariant and positions travel with the patches);
- the blocks are the lab's pre-LN ``TransformerBlock`` (timm's ViT block, which HF's ``ViltLayer``
  reproduces: LN before attention, LN before the MLP);
- **ITM negatives** come from the other rows of the batch (``losses.random_negatives``); ViLT draws a
  random image from the dataset, the same distribution for a shuffled batch;
- the MLM decoder is untied from the word embeddings, as in the original (transformers 5 ties them);
- the optional ``rank_head`` is HF's ``ViltForImageAndTextRetrieval.rank_output`` (single logit);
- ``mlm_weight = 0`` skips the MLM pass (``mlm_logits`` / ``mlm_labels`` are then None).

**Training from scratch (toy scale).** ViLT initialises its transformer from ImageNet ViT-B/32 weights; from a
random initialisation with ITM + MLM + WPA together, ITM stays at chance (held-out accuracy ~0.5 after 600-1000
steps on the shapes world) while ITM alone leaves chance after ~200-300 steps. The cause is the balance of
gradients on the shared transformer: at initialisation the MLM gradient is ~140x the ITM gradient (ITM sits on
the ln 2 plateau and reaches the trunk only through the small pooler and ITM head), so under Adam's
per-parameter scaling the ITM share of every update is ~1 %, and MLM settles on its text-only solution (the
language prior) first. The toy recipe (``assets/make_vilt_toy.py``, a labelled deviation) keeps the three
objectives but sets ``mlm_weight = 0.05``: held-out ITM accuracy 0.86 / 0.85 / 0.77 after 1,200 steps (seeds
0 / 1 / 2) against 0.50 / 0.51 at the paper's weights. A curriculum (ITM + WPA alone for 400 steps, then the
paper's weights) also works (0.86 in one run); see notebook 03, section 5.

Shape letters: b batch, m text tokens, n image tokens (patches kept), g_h / g_w patch grid, P = g_h g_w,
d width, v vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..interop import load_converted, rename_keys
from ..losses import itm_loss, mask_tokens, mlm_loss, random_negatives, wpa_loss
from ..nn import Encoder, ModalityTypeEmbedding, check_pixel_values, check_token_ids, get_activation
from ._config import config_from_dict


@dataclass
class ViLTConfig:
    """Hyper-parameters of ViLT. Presets: ``toy()`` (CPU, seconds) and ``paper()`` (ViLT-B/32)."""

    vocab_size: int = 30522  # word vocabulary (BERT uncased: 30,522)
    max_text_len: int = 40  # text positions (ViLT: 40 tokens)
    type_vocab_size: int = 2  # BERT token-type rows inside the text embedding (always type 0 here)
    image_size: int = 384  # side of the position grid the table is trained for (ViLT: 384 px short side)
    patch_size: int = 32  # ViT-B/32 patches
    width: int = 768  # token width d
    depth: int = 12  # transformer blocks
    heads: int = 12  # attention heads
    mlp_dim: int = 3072  # MLP hidden width
    act: str = "gelu"  # MLP activation
    ln_eps: float = 1e-12  # LayerNorm epsilon (HF ViltConfig default; timm uses 1e-6)
    qkv_bias: bool = True  # bias on q, k, v
    dropout: float = 0.0  # dropout in embeddings and blocks (ViLT pre-training: 0.1)
    num_modality_types: int = 2  # modality-type rows: 0 text, 1 image (NLVR2 adds a row 2 for a second image)
    max_image_len: int = -1  # patches kept per image in training: K > 0 samples K (ViLT pre-training: 200)
    pad_token_id: int = 0  # [PAD]
    mask_token_id: int = 103  # [MASK] (BERT uncased: 103)
    special_token_ids: tuple[int, ...] = (0, 100, 101, 102, 103)  # never masked: [PAD] [UNK] [CLS] [SEP] [MASK]
    mlm_probability: float = 0.15  # share of text tokens chosen for MLM
    whole_word_masking: bool = False  # mask all pieces of a word together (ViLT pre-training: True)
    itm_weight: float = 1.0  # weight of the ITM loss
    mlm_weight: float = 1.0  # weight of the MLM loss
    wpa_weight: float = 0.1  # weight of word-patch alignment (ViLT: 0.1; 0 switches it off)
    rank_head: bool = False  # add HF's single-logit retrieval head (``rank_output``)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_text_len", "image_size", "patch_size", "width", "depth", "heads",
                     "mlp_dim", "num_modality_types", "type_vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ViLTConfig.{name} must be a positive int, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"ViLTConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViLTConfig.image_size ({self.image_size}) must be divisible by "
                             f"patch_size ({self.patch_size})")
        if self.max_image_len == 0 or self.max_image_len < -1:
            raise ValueError(f"ViLTConfig.max_image_len must be -1 (keep all) or > 0, got {self.max_image_len}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"ViLTConfig.mask_token_id must lie in [0, vocab_size={self.vocab_size}), "
                             f"got {self.mask_token_id}")
        self.special_token_ids = tuple(int(i) for i in self.special_token_ids)
        get_activation(self.act)

    @classmethod
    def toy(cls, **overrides: Any) -> "ViLTConfig":
        """A ViLT for the 32 px shapes world and its WordPiece tokenizer ([PAD] 0 [UNK] 1 [CLS] 2 [SEP] 3 [MASK] 4)."""
        base = dict(vocab_size=128, max_text_len=24, image_size=32, patch_size=8, width=96, depth=3, heads=4,
                    mlp_dim=256, ln_eps=1e-6, pad_token_id=0, mask_token_id=4, special_token_ids=(0, 1, 2, 3, 4))
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, **overrides: Any) -> "ViLTConfig":
        """ViLT-B/32 (Kim et al., 2021, sec. 4; ``vilt/config.py``): ViT-B/32 (768 wide, 12 layers, 12 heads,
        MLP 3072), 384 px short side, BERT vocabulary 30,522, 40 text tokens, 200 sampled patches,
        whole-word masking, dropout 0.1."""
        base = dict(max_image_len=200, whole_word_masking=True, dropout=0.1)
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViLTConfig":
        return config_from_dict(cls, d)


@dataclass
class ViLTFusion:
    """What one pass of the fusion transformer gives (``ViLT.fuse``)."""

    hidden: Tensor  # (b, m + 1 + n, d) final hidden states, text first
    text_feats: Tensor  # (b, m, d) the text part
    image_feats: Tensor  # (b, 1 + n, d) the image part, image [CLS] first
    pooled: Tensor  # (b, d) tanh(W z[:, 0]), the text [CLS]
    text_mask: Tensor  # (b, m) 1 = real token
    image_mask: Tensor  # (b, 1 + n) 1 = real patch
    patch_index: Tensor  # (b, n, 2) (row, column) of each kept patch in the grid


@dataclass
class ViLTOutput:
    """What ``ViLT.forward`` returns (pre-training: ITM + MLM + WPA)."""

    loss: Tensor  # scalar weighted sum
    loss_itm: Tensor  # scalar image-text matching CE
    loss_mlm: Tensor  # scalar masked-LM CE over chosen tokens
    loss_wpa: Tensor  # scalar word-patch alignment (already times wpa_weight)
    itm_logits: Tensor  # (b, 2) column 1 = "match"
    itm_labels: Tensor  # (b,) 1 for true pairs
    mlm_logits: Tensor | None  # (b, m, v); None when mlm_weight == 0 (the MLM pass is skipped)
    mlm_labels: Tensor | None  # (b, m) original ids at chosen positions, -100 elsewhere; None likewise


class TextEmbeddings(nn.Module):
    """BERT's embeddings: word + position + token type, then LayerNorm and dropout: ``(b, m) -> (b, m, d)``."""

    def __init__(self, c: ViLTConfig) -> None:
        super().__init__()
        self.vocab_size, self.max_length = c.vocab_size, c.max_text_len
        self.word_embeddings = nn.Embedding(c.vocab_size, c.width)
        self.position_embeddings = nn.Embedding(c.max_text_len, c.width)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.width)
        self.norm = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, input_ids: Tensor) -> Tensor:
        check_token_ids(input_ids, self.vocab_size, self.max_length)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.dropout(self.norm(x))  # (b, m, d)


class MLMHead(nn.Module):
    """BERT's prediction head: Linear -> act -> LayerNorm -> Linear to the vocabulary."""

    def __init__(self, c: ViLTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.width, c.width)
        self.act = get_activation(c.act)
        self.norm = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.decoder = nn.Linear(c.width, c.vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))  # (b, m, v)


class ViLT(nn.Module):
    """Single-stream vision-language transformer with ITM, MLM and WPA pre-training heads."""

    def __init__(self, config: ViLTConfig) -> None:
        super().__init__()
        c = self.config = config
        self.text_embed = TextEmbeddings(c)
        self.patch_proj = nn.Conv2d(3, c.width, kernel_size=c.patch_size, stride=c.patch_size)  # linear projection
        self.grid = c.image_size // c.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.grid**2 + 1, c.width))
        self.modality = ModalityTypeEmbedding(c.num_modality_types, c.width)
        self.embed_dropout = nn.Dropout(c.dropout)
        self.encoder = Encoder(c.width, c.depth, c.heads, c.mlp_dim, act=c.act, ln_eps=c.ln_eps, dropout=c.dropout,
                               qkv_bias=c.qkv_bias, final_norm=True)
        self.pooler = nn.Linear(c.width, c.width)
        self.itm_head = nn.Linear(c.width, 2)
        self.mlm_head = MLMHead(c)
        self.rank_head = nn.Linear(c.width, 1) if c.rank_head else None
        self._init_weights()

    def _init_weights(self) -> None:
        """BERT / timm ViT initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding, nn.Conv2d)):
                nn.init.normal_(mod.weight, std=0.02)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    # --- the image side: patch projection, no CNN ----------------------------------------------------------
    def visual_embed(self, pixel_values: Tensor, pixel_mask: Tensor | None = None,
                     max_image_len: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(b, 3, H, W)`` -> ``(tokens (b, 1 + n, d), mask (b, 1 + n), patch_index (b, n, 2))``.

        ``max_image_len`` (default: ``config.max_image_len`` in training, -1 in eval) caps the patches kept.
        """
        c = self.config
        check_pixel_values(pixel_values, None)
        b, _, H, W = pixel_values.shape
        if H % c.patch_size or W % c.patch_size:
            raise ValueError(f"pixel_values height and width must be multiples of patch_size={c.patch_size}, "
                             f"got {(H, W)}")
        if pixel_mask is None:
            pixel_mask = torch.ones(b, H, W, dtype=torch.long, device=pixel_values.device)
        if pixel_mask.shape != (b, H, W):
            raise ValueError(f"pixel_mask must be (batch, H, W) = {(b, H, W)}, got {tuple(pixel_mask.shape)}")
        x = self.patch_proj(pixel_values.to(self.patch_proj.weight.dtype))  # (b, d, g_h, g_w)
        d, gh, gw = x.shape[1:]
        mask = F.interpolate(pixel_mask[:, None].float(), size=(gh, gw)).long()[:, 0]  # (b, g_h, g_w) nearest
        hs, ws = mask[:, :, 0].sum(1), mask[:, 0, :].sum(1)  # (b,) valid rows / columns
        if (hs == 0).any() or (ws == 0).any():
            raise ValueError("pixel_mask leaves an image without any valid patch")
        table = self.position_embeddings[:, 1:].transpose(1, 2).reshape(1, d, self.grid, self.grid)  # (1, d, g, g)
        pos = []
        for h, w in zip(hs.tolist(), ws.tolist()):
            p = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)  # (1, d, h, w)
            pos.append(F.pad(p, (0, gw - w, 0, gh - h)))  # (1, d, g_h, g_w)
        pos = torch.cat(pos).flatten(2).transpose(1, 2)  # (b, d, g_h, g_w) -> (b, P, d)
        x = x.flatten(2).transpose(1, 2)  # (b, d, g_h, g_w) -> (b, P, d)
        mask = mask.flatten(1)  # (b, P)
        grid_index = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1)
        grid_index = grid_index.reshape(1, gh * gw, 2).expand(b, -1, -1).to(x.device)  # (b, P, 2)

        limit = (c.max_image_len if self.training else -1) if max_image_len is None else max_image_len
        valid = mask.sum(1)  # (b,)
        keep = int(valid.max()) if limit is None or limit < 0 else min(int(valid.max()), int(limit))
        sample = self.training or (max_image_len is not None and max_image_len > 0)
        key = torch.rand(b, gh * gw, device=x.device) if sample else torch.arange(gh * gw, device=x.device
                                                                                   ).float().expand(b, -1) / (gh * gw)
        key = key + (1 - mask).float() * 2.0  # valid patches sort first, then padding
        select = key.argsort(dim=1)[:, :keep]  # (b, n) patch ids kept
        x = x.gather(1, select[..., None].expand(-1, -1, d))  # (b, n, d)
        pos = pos.gather(1, select[..., None].expand(-1, -1, d))  # (b, n, d)
        mask = mask.gather(1, select)  # (b, n)
        patch_index = grid_index.gather(1, select[..., None].expand(-1, -1, 2))  # (b, n, 2)

        cls = self.cls_token.expand(b, -1, -1)  # (b, 1, d)
        x = torch.cat([cls, x], 1) + torch.cat([self.position_embeddings[:, :1].expand(b, -1, -1), pos], 1)
        mask = torch.cat([mask.new_ones(b, 1), mask], 1)  # (b, 1 + n)
        return self.embed_dropout(x), mask, patch_index

    # --- the model ------------------------------------------------------------------------------------------
    def fuse(self, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor | None = None, *,
             pixel_mask: Tensor | None = None, image_token_type_idx: int = 1,
             max_image_len: int | None = None) -> ViLTFusion:
        """Embed both modalities, concatenate (text first) and run the one transformer over them."""
        text = self.text_embed(input_ids)  # (b, m, d)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"got {pixel_values.shape[0]} images for {input_ids.shape[0]} captions; "
                             "ViLT fuses one image with one caption")
        image, image_mask, patch_index = self.visual_embed(pixel_values, pixel_mask, max_image_len)
        text = self.modality(text, 0)  # + type_0
        image = self.modality(image, image_token_type_idx)  # + type_1
        x = torch.cat([text, image], dim=1)  # (b, m + 1 + n, d)
        key_mask = torch.cat([attention_mask.long(), image_mask.long()], dim=1)  # (b, m + 1 + n)
        hidden = self.encoder(x, key_padding_mask=key_mask)
        m = input_ids.shape[1]
        pooled = torch.tanh(self.pooler(hidden[:, 0]))  # (b, d) the text [CLS]
        return ViLTFusion(hidden=hidden, text_feats=hidden[:, :m], image_feats=hidden[:, m:], pooled=pooled,
                          text_mask=attention_mask, image_mask=image_mask, patch_index=patch_index)

    def itm_scores(self, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Log-odds that each caption matches its image: ``(b,)`` (ITM logit 1 minus logit 0)."""
        logits = self.itm_head(self.fuse(input_ids, pixel_values, attention_mask).pooled)  # (b, 2)
        return logits[:, 1] - logits[:, 0]

    def mlm_logits(self, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Vocabulary logits for every text position ``(b, m, v)`` (fill in [MASK] tokens)."""
        return self.mlm_head(self.fuse(input_ids, pixel_values, attention_mask).text_feats)

    def alignment_masks(self, fusion: ViLTFusion) -> tuple[Tensor, Tensor]:
        """Valid positions for WPA: words without [CLS] (index 0) and the last real token ([SEP]); patches
        without the image [CLS] and padding. ``(b, m)``, ``(b, 1 + n)`` bool."""
        text_valid = fusion.text_mask.bool().clone()
        text_valid[:, 0] = False
        last = fusion.text_mask.long().sum(1) - 1  # (b,) index of [SEP]
        text_valid[torch.arange(text_valid.shape[0]), last] = False
        image_valid = fusion.image_mask.bool().clone()
        image_valid[:, 0] = False
        return text_valid, image_valid

    def forward(self, batch: dict[str, Any]) -> ViLTOutput:
        """Pre-training step on ``pixel_values``, ``input_ids``, ``attention_mask`` (optional ``pixel_mask``).

        Two passes, as in ViLT: MLM on masked text with the true image; ITM (+ WPA) on unmasked text with
        the true image for half the rows and another row's image for the other half.
        """
        c = self.config
        if not isinstance(batch, dict):
            raise TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
        missing = [k for k in ("pixel_values", "input_ids") if k not in batch]
        if missing:
            raise KeyError(f"batch is missing {missing}; it has {sorted(batch)}")
        ids, px = batch["input_ids"], batch["pixel_values"]
        am = batch.get("attention_mask")
        am = torch.ones_like(ids) if am is None else am
        pm = batch.get("pixel_mask")
        # MLM: masked caption + its own image (skipped when mlm_weight == 0, e.g. the toy ITM warm-up stage)
        if c.mlm_weight > 0:
            masked, mlm_labels = mask_tokens(
                ids, mask_token_id=c.mask_token_id, vocab_size=c.vocab_size, special_token_ids=c.special_token_ids,
                attention_mask=am, mlm_probability=c.mlm_probability,
                word_starts=batch.get("word_starts") if c.whole_word_masking else None)
            mlm_fusion = self.fuse(masked, px, am, pixel_mask=pm)
            mlm_logits = self.mlm_head(mlm_fusion.text_feats)  # (b, m, v)
            loss_mlm = mlm_loss(mlm_logits, mlm_labels)
        else:
            mlm_logits = mlm_labels = None
            loss_mlm = px.new_zeros(())
        # ITM: half of the captions get another row's image
        image_index, itm_labels = random_negatives(ids.shape[0], group_ids=batch.get("group_ids"),
                                                   device=ids.device)
        fusion = self.fuse(ids, px[image_index], am, pixel_mask=None if pm is None else pm[image_index])
        itm_logits = self.itm_head(fusion.pooled)  # (b, 2)
        loss_itm = itm_loss(itm_logits, itm_labels)
        if c.wpa_weight > 0:
            tv, iv = self.alignment_masks(fusion)
            loss_wpa = wpa_loss(fusion.text_feats, fusion.image_feats, tv, iv, itm_labels.bool(), weight=c.wpa_weight)
        else:
            loss_wpa = itm_logits.new_zeros(())
        loss = c.itm_weight * loss_itm + c.mlm_weight * loss_mlm + loss_wpa
        return ViLTOutput(loss=loss, loss_itm=loss_itm, loss_mlm=loss_mlm, loss_wpa=loss_wpa, itm_logits=itm_logits,
                          itm_labels=itm_labels, mlm_logits=mlm_logits, mlm_labels=mlm_labels)

    # --- interop --------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "ViLT":
        """A lab ViLT with the weights of a transformers ``ViltModel``, ``ViltForMaskedLM`` or
        ``ViltForImageAndTextRetrieval`` (heads the source lacks keep their fresh initialisation)."""
        hc = getattr(hf_model, "config", None)
        if hc is None or getattr(hc, "model_type", None) != "vilt":
            raise TypeError(f"hf_model must be a transformers ViLT model, got {type(hf_model).__name__}")
        if hc.hidden_act not in ("gelu",):
            raise ValueError(f"only hidden_act='gelu' is supported, got {hc.hidden_act!r}")
        state = dict(hf_model.state_dict())
        prefix = "vilt." if any(k.startswith("vilt.") for k in state) else ""
        config = ViLTConfig(
            vocab_size=hc.vocab_size, max_text_len=hc.max_position_embeddings, type_vocab_size=hc.type_vocab_size,
            image_size=hc.image_size, patch_size=hc.patch_size, width=hc.hidden_size, depth=hc.num_hidden_layers,
            heads=hc.num_attention_heads, mlp_dim=hc.intermediate_size, act=hc.hidden_act, ln_eps=hc.layer_norm_eps,
            qkv_bias=hc.qkv_bias, num_modality_types=hc.modality_type_vocab_size,
            max_image_len=hc.max_image_length if hc.max_image_length and hc.max_image_length > 0 else -1,
            pad_token_id=hc.pad_token_id if hc.pad_token_id is not None else 0,
            mask_token_id=min(103, hc.vocab_size - 1), special_token_ids=(),
            rank_head=any(k.startswith("rank_output.") for k in state))
        model = cls(config)
        p = prefix.replace(".", r"\.")
        L = rf"^{p}encoder\.layer\.(\d+)\."
        rules = [
            (rf"^{p}embeddings\.text_embeddings\.word_embeddings\.", "text_embed.word_embeddings."),
            (rf"^{p}embeddings\.text_embeddings\.position_embeddings\.", "text_embed.position_embeddings."),
            (rf"^{p}embeddings\.text_embeddings\.token_type_embeddings\.", "text_embed.token_type_embeddings."),
            (rf"^{p}embeddings\.text_embeddings\.LayerNorm\.", "text_embed.norm."),
            (rf"^{p}embeddings\.cls_token$", "cls_token"),
            (rf"^{p}embeddings\.position_embeddings$", "position_embeddings"),
            (rf"^{p}embeddings\.patch_embeddings\.projection\.", "patch_proj."),
            (rf"^{p}embeddings\.token_type_embeddings\.", "modality.embedding."),
            (L + r"attention\.attention\.query\.", r"encoder.blocks.\1.attn.q_proj."),
            (L + r"attention\.attention\.key\.", r"encoder.blocks.\1.attn.k_proj."),
            (L + r"attention\.attention\.value\.", r"encoder.blocks.\1.attn.v_proj."),
            (L + r"attention\.output\.dense\.", r"encoder.blocks.\1.attn.out_proj."),
            (L + r"layernorm_before\.", r"encoder.blocks.\1.norm1."),
            (L + r"layernorm_after\.", r"encoder.blocks.\1.norm2."),
            (L + r"intermediate\.dense\.", r"encoder.blocks.\1.mlp.fc1."),
            (L + r"output\.dense\.", r"encoder.blocks.\1.mlp.fc2."),
            (rf"^{p}layernorm\.", "encoder.norm."),
            (rf"^{p}pooler\.dense\.", "pooler."),
            (r"^mlm_score\.transform\.dense\.", "mlm_head.dense."),
            (r"^mlm_score\.transform\.LayerNorm\.", "mlm_head.norm."),
            (r"^mlm_score\.decoder\.", "mlm_head.decoder."),
            (r"^rank_output\.", "rank_head."),
        ]
        state = rename_keys(state, rules, drop=[r"position_ids$", r"token_type_ids$", r"^mlm_score\.bias$"])
        own = model.state_dict()
        for key in own:  # heads the source does not have keep their initialisation
            if key not in state and key.split(".")[0] in ("itm_head", "mlm_head", "pooler"):
                state[key] = own[key]
        load_converted(model, state, source=f"transformers {type(hf_model).__name__}")
        return model.to(next(hf_model.parameters()).dtype)

    def extra_repr(self) -> str:
        return f"config={asdict(self.config)}"
