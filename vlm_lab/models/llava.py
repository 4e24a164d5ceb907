"""LLaVA: Visual Instruction Tuning (Liu et al., 2023; LLaVA-1.5: Liu et al., 2024), as Quilt-LLaVA uses it for
pathology (Seyfioglu et al., 2024, "Quilt-LLaVA: Visual Instruction Tuning by Extracting Localized Narratives
from Open-Source Histopathology Videos").

The architecture, top to bottom::

    image (m, 3, H, W)                                    m = images in the batch (0, 1 or several per conversation)
      -> frozen vision tower (CLIP ViT-L/14-336; Quilt-LLaVA's scripts: QuiltNet-B-32)
         hidden_states[-2]: output of the penultimate block, before post-LN        (m, 1 + g*g, c)
         drop the class token ("default" / LLaVA's select_feature="patch")          (m, p, c),  p = g*g
      -> projector Linear(c -> D) -> GELU -> Linear(D -> D)  (LLaVA-1.5 "mlp2x_gelu")  (m, p, D)
      -> spliced into the conversation at each <image> placeholder                (b, n + k*(p-1), D)
      -> causal LM (Vicuna / Llama; here any transformers OPT / Llama decoder), next-token loss on the answers

Matches ``haotian-liu/LLaVA`` (``llava_arch.py::prepare_inputs_labels_for_multimodal``, ``train.py::preprocess_v1``,
``conversation.py`` ``vicuna_v1``) and Hugging Face ``modeling_llava.py`` (read for facts, not copied).
``LLaVA.from_hf`` loads ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama / OPT text model) with the
same logits (``tests/test_llava.py``; written against transformers 5.25). Choices, written down:

- **Splicing.** The tokenised conversation holds *one* placeholder id per image; ``splice`` strips each row's
  padding (by ``attention_mask``), replaces every placeholder by that image's ``p`` projected tokens (labels
  ``-100``), and re-pads the batch (right for training, left for generation), as the LLaVA repository does.
  Transformers' processor instead repeats the placeholder ``p`` times and ``masked_scatter``s the features in
  -- the same sequence, hence the parity test. Images are consumed in reading order (row 0's images first).
  A spliced row longer than the LM's ``max_positions`` raises (LLaVA truncates silently).
- **Conversation and masking.** ``ConversationTemplate.vicuna_v1()`` is LLaVA's ``vicuna_v1``:
  ``system + " USER: <image>\\n{q} ASSISTANT: {a}</s>USER: ..."``; ``toy()`` drops the system prompt. Only the
  assistant's answers and their ``</s>`` are learned. The lab tokenises the conversation *piece by piece*
  (so the label boundaries are exact) and then checks that the pieces concatenate to the tokenisation of the
  whole string. LLaVA's ``preprocess_v1`` computes the boundaries by length arithmetic and, when they disagree
  with the tokenizer, masks the whole sample and prints a warning (the loss silently becomes 0: LLaVA issues
  #779, #1166, #1706); here the mismatch raises ``MaskingMismatchError`` naming the sample and the first
  differing token, or is reported (``on_mismatch="report"``) and the sample dropped, never silently zeroed.
- **Two stages** (``configure_stage``): stage 1 ("feature alignment") trains the projector only, vision tower and
  LM frozen; stage 2 ("visual instruction tuning") trains projector + LM, vision tower frozen. Frozen modules
  are also kept in eval mode by ``train()``.
- **The LM** is built from a ``CausalLMConfig`` (``vlm_lab.models.lm``); ``tie_word_embeddings`` is a LLaVA
  field because Vicuna / Llama-2 checkpoints have an untied ``lm_head`` while the lab's toy LM ties it.

Shape letters: b conversations, m images in the batch, g patches per side, p image tokens per image (g*g, or
1 + g*g with the class token kept), c vision width, n text tokens, t spliced tokens, D LM width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..interop import load_converted, rename_keys
from ..losses.captioning import lm_loss
from ..nn import ViT, ViTConfig, check_pixel_values
from ..nn.adapters import MLPProjector
from ._config import config_from_dict
from .lm import CausalLMConfig

__all__ = ["LLaVA", "LLaVAConfig", "LLaVAOutput", "ConversationTemplate", "MaskingMismatchError",
           "tokenize_conversation", "tokenize_conversations", "collate_conversations", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # label of positions that are not learned (PyTorch's cross-entropy default)
_SELECT = ("default", "full")


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LLaVAConfig:
    """Hyper-parameters of LLaVA. Presets: ``toy()`` (the CoCa toy tower + a small OPT), ``paper()`` (LLaVA-1.5-7B)."""

    # --- vision tower (a CLIP-style ViT; frozen)
    image_size: int = 336  # input pixels per side
    patch_size: int = 14  # patch side; g = image_size / patch_size
    vision_width: int = 1024  # token width c
    vision_layers: int = 24  # ViT blocks
    vision_heads: int = 16  # ViT attention heads
    vision_mlp_dim: int = 4096  # ViT MLP hidden width
    vision_act: str = "quick_gelu"  # ViT MLP activation (OpenAI CLIP: quick_gelu)
    vision_ln_pre: bool = True  # LayerNorm after the embeddings (CLIP: yes; the lab's CoCa tower: no)
    vision_patch_bias: bool = False  # bias in the patch projection (CLIP: no; CoCa / timm: yes)
    vision_ln_eps: float = 1e-5  # ViT LayerNorm epsilon
    vision_feature_layer: int = -2  # which hidden state feeds the projector (-2: the penultimate block's output)
    vision_feature_select: str = "default"  # "default": drop the class token (LLaVA "patch"); "full": keep it
    # --- projector
    projector_act: str = "gelu"  # activation between the projector's two linears (mlp2x_gelu)
    # --- language model
    lm: CausalLMConfig | None = None  # the causal LM (Vicuna-7B in the paper)
    tie_word_embeddings: bool = False  # lm_head shares the token table (Vicuna: no; the lab's toy OPT: yes)
    image_token_id: int = 32000  # the <image> placeholder id in the LM's vocabulary (llava-1.5-hf: 32000)

    def __post_init__(self) -> None:
        if isinstance(self.lm, dict):
            self.lm = CausalLMConfig.from_dict(self.lm)
        if self.lm is None:
            self.lm = CausalLMConfig.paper("llama-7b", vocab_size=32064, max_positions=4096)
        if not isinstance(self.lm, CausalLMConfig):
            raise TypeError(f"LLaVAConfig.lm must be a CausalLMConfig, got {type(self.lm).__name__}")
        for name in ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vision_mlp_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"LLaVAConfig.{name} must be a positive int, got {v!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"LLaVAConfig.image_size ({self.image_size}) must be divisible by "
                             f"patch_size ({self.patch_size})")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"LLaVAConfig.vision_width ({self.vision_width}) must be divisible by "
                             f"vision_heads ({self.vision_heads})")
        if not -(self.vision_layers + 1) <= self.vision_feature_layer <= self.vision_layers:
            raise ValueError(f"LLaVAConfig.vision_feature_layer must index one of the {self.vision_layers + 1} "
                             f"hidden states (embeddings + {self.vision_layers} blocks), "
                             f"got {self.vision_feature_layer}")
        if self.vision_feature_select not in _SELECT:
            raise ValueError(f"LLaVAConfig.vision_feature_select must be one of {_SELECT}, "
                             f"got {self.vision_feature_select!r}")
        if not 0 <= self.image_token_id < self.lm.vocab_size:
            raise ValueError(f"LLaVAConfig.image_token_id must be in [0, lm.vocab_size={self.lm.vocab_size}), "
                             f"got {self.image_token_id}")

    @property
    def num_image_tokens(self) -> int:
        """p: LM positions one image occupies after splicing."""
        g = self.image_size // self.patch_size
        return g * g + (1 if self.vision_feature_select == "full" else 0)

    @classmethod
    def toy(cls, **overrides: Any) -> "LLaVAConfig":
        """CPU toy: the lab's toy CoCa image tower (32 px, patch 8 -> 16 image tokens x 64, 2 blocks; features of
        block 1) and a small OPT (width 64, 2 layers, 320 positions) over a byte-level BPE vocabulary of 1024
        whose ``<image>`` id is 4 (``vlm_lab.data.tokenizers.train_bpe``)."""
        lm = overrides.pop("lm", None) or CausalLMConfig.toy(vocab_size=1024, width=64, layers=2, heads=4,
                                                             mlp_dim=128, max_positions=320)
        base = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
                    vision_mlp_dim=128, vision_act="gelu", vision_ln_pre=False, vision_patch_bias=True,
                    vision_ln_eps=1e-5, lm=lm, tie_word_embeddings=True, image_token_id=4)
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, **overrides: Any) -> "LLaVAConfig":
        """LLaVA-1.5-7B (``llava-hf/llava-1.5-7b-hf``): CLIP ViT-L/14 at 336 px (24 blocks, width 1024, 576 patch
        tokens from block 23), mlp2x_gelu projector 1024 -> 4096 -> 4096, Vicuna-7B (Llama: 32 layers, d 4096,
        FFN 11008, vocabulary 32064 with ``<image>`` = 32000, 4096 positions). Shapes only (use the meta
        device). Quilt-LLaVA's released scripts swap the tower for QuiltNet-B-32 (ViT-B/32 at 224: 49 tokens x 768):
        ``LLaVAConfig.paper(image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
        vision_mlp_dim=3072)``."""
        return cls(**overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LLaVAConfig":
        return config_from_dict(cls, d, nested={"lm": CausalLMConfig})


@dataclass
class LLaVAOutput:
    """What ``LLaVA.forward`` returns."""

    loss: Tensor | None  # scalar next-token loss on the answer tokens (None without labels)
    logits: Tensor  # (b, t, V) LM logits over the spliced sequence
    labels: Tensor | None  # (b, t) spliced labels (-100 on prompts, images and padding)
    attention_mask: Tensor  # (b, t) 1 for real positions
    image_embeds: Tensor | None = None  # (m, p, D) projected image tokens (None for a text-only batch)


# ---------------------------------------------------------------------------------------------------------------
# Conversations: template, tokenisation with masking, padding
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConversationTemplate:
    """How a conversation is written as one string (LLaVA's ``Conversation`` with ``SeparatorStyle.TWO``)."""

    system: str = ""  # system prompt ("" for none)
    user: str = "USER"  # role names
    assistant: str = "ASSISTANT"
    image_token: str = "<image>"  # placeholder string (a special token of the tokenizer)

    @classmethod
    def vicuna_v1(cls) -> "ConversationTemplate":
        """LLaVA-1.5 / Quilt-LLaVA's ``vicuna_v1``."""
        return cls(system="A chat between a curious user and an artificial intelligence assistant. The assistant "
                          "gives helpful, detailed, and polite answers to the user's questions.")

    @classmethod
    def toy(cls) -> "ConversationTemplate":
        """``vicuna_v1`` without the system prompt (it would cost a tiny model ~30 positions per sample)."""
        return cls()

    def pieces(self, turns: Sequence[tuple[str, str | None]], eos: str) -> list[tuple[str, bool]]:
        """``[(text, learned), ...]`` of the rendered conversation; the last answer may be None (a prompt for
        generation, ending with ``" ASSISTANT:"``). Every piece after the first starts at a word boundary."""
        if not turns:
            raise ValueError("turns: expected at least one (question, answer) pair")
        out: list[tuple[str, bool]] = []
        for i, (q, a) in enumerate(turns):
            if not isinstance(q, str):
                raise TypeError(f"turns[{i}]: the question must be a str, got {type(q).__name__}")
            if a is None and i != len(turns) - 1:
                raise ValueError(f"turns[{i}]: only the last turn may have no answer (None)")
            head = f"{self.system} " if (i == 0 and self.system) else ""
            out.append((f"{head}{self.user}: {q} {self.assistant}:", False))
            if a is not None:
                if not isinstance(a, str) or not a.strip():
                    raise ValueError(f"turns[{i}]: the answer must be a non-empty str, got {a!r}")
                out.append((f" {a.strip()}{eos}", True))
        return out

    def render(self, turns: Sequence[tuple[str, str | None]], eos: str = "</s>") -> str:
        """The whole conversation as one string."""
        return "".join(t for t, _ in self.pieces(turns, eos))


class MaskingMismatchError(ValueError):
    """The piecewise tokenisation (that places the label boundaries) differs from the tokenisation of the whole
    conversation: masking would be wrong for this sample."""


def tokenize_conversation(turns: Sequence[tuple[str, str | None]], tokenizer: Any,
                          template: ConversationTemplate | None = None, *, index: int = 0) -> dict[str, list[int]]:
    """``turns`` -> ``{"input_ids": [...], "labels": [...]}`` (lists of ints), labels ``-100`` everywhere except on
    the assistant's answers and their end-of-sequence token. A BOS token is prepended when the tokenizer has one.

    Raises ``MaskingMismatchError`` (with ``index`` in the message) when the pieces do not tokenise as the whole.
    """
    template = template or ConversationTemplate.toy()
    eos = tokenizer.eos_token
    if eos is None:
        raise ValueError("tokenizer: needs an eos_token (it ends every answer)")
    bos_id = tokenizer.bos_token_id
    ids: list[int] = [] if bos_id is None else [bos_id]
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    pieces = template.pieces(turns, eos)
    for text, learned in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if learned else [IGNORE_INDEX] * len(piece)
    whole = ([] if bos_id is None else [bos_id]) + tokenizer("".join(t for t, _ in pieces),
                                                             add_special_tokens=False)["input_ids"]
    if whole != ids:
        k = next((i for i, (x, y) in enumerate(zip(whole, ids)) if x != y), min(len(whole), len(ids)))
        raise MaskingMismatchError(
            f"sample {index}: the masking boundaries do not match the tokenizer -- the whole conversation has "
            f"{len(whole)} tokens, the pieces {len(ids)}; first difference at token {k} "
            f"({tokenizer.convert_ids_to_tokens(whole[k:k + 3])} vs {tokenizer.convert_ids_to_tokens(ids[k:k + 3])}). "
            "Make every piece start at a word boundary the tokenizer respects (LLaVA would mask this sample "
            "entirely and print a warning)")
    return {"input_ids": ids, "labels": labels}


def tokenize_conversations(conversations: Sequence[Sequence[tuple[str, str | None]]], tokenizer: Any,
                           template: ConversationTemplate | None = None, *, on_mismatch: str = "raise"
                           ) -> tuple[list[dict[str, list[int]]], list[str]]:
    """Tokenise many conversations: ``(encodings, report)``. ``on_mismatch="raise"`` (default) stops at the first
    ``MaskingMismatchError``; ``"report"`` drops such samples and lists one message per dropped sample in
    ``report`` (check it: a non-empty report means training data went missing)."""
    if on_mismatch not in ("raise", "report"):
        raise ValueError(f"on_mismatch must be 'raise' or 'report', got {on_mismatch!r}")
    encs, report = [], []
    for i, turns in enumerate(conversations):
        try:
            encs.append(tokenize_conversation(turns, tokenizer, template, index=i))
        except MaskingMismatchError as e:
            if on_mismatch == "raise":
                raise
            report.append(str(e))
    return encs, report


def collate_conversations(encodings: Sequence[dict[str, Sequence[int]]], pad_token_id: int,
                          padding_side: str = "right") -> dict[str, Tensor]:
    """Pad token lists into ``input_ids`` / ``attention_mask`` / ``labels`` ``(b, n)`` tensors (labels ``-100`` on
    padding; ``labels`` only when every encoding has them)."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not encodings:
        raise ValueError("encodings: expected at least one conversation")
    n = max(len(e["input_ids"]) for e in encodings)
    b = len(encodings)
    ids = torch.full((b, n), pad_token_id, dtype=torch.long)  # (b, n)
    mask = torch.zeros((b, n), dtype=torch.long)  # (b, n)
    with_labels = all("labels" in e for e in encodings)
    labels = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)  # (b, n)
    for i, e in enumerate(encodings):
        k = len(e["input_ids"])
        sl = slice(n - k, n) if padding_side == "left" else slice(0, k)
        ids[i, sl] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        mask[i, sl] = 1
        if with_labels:
            if len(e["labels"]) != k:
                raise ValueError(f"encodings[{i}]: {len(e['labels'])} labels for {k} input ids")
            labels[i, sl] = torch.as_tensor(e["labels"], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if with_labels:
        out["labels"] = labels
    return out


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
def _build_lm(c: LLaVAConfig) -> nn.Module:
    from transformers import LlamaForCausalLM, OPTForCausalLM

    hf = c.lm.to_hf()
    hf.tie_word_embeddings = c.tie_word_embeddings
    return (OPTForCausalLM if c.lm.arch == "opt" else LlamaForCausalLM)(hf)


class LLaVA(nn.Module):
    """Frozen vision tower -> MLP projector -> image tokens spliced into a causal LM's input."""

    def __init__(self, config: LLaVAConfig) -> None:
        super().__init__()
        if not isinstance(config, LLaVAConfig):
            raise TypeError(f"config must be a LLaVAConfig, got {type(config).__name__}")
        c = self.config = config
        self.vision_tower = ViT(ViTConfig(
            image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width, layers=c.vision_layers,
            heads=c.vision_heads, mlp_dim=c.vision_mlp_dim, act=c.vision_act, ln_pre=c.vision_ln_pre,
            ln_eps=c.vision_ln_eps, patch_bias=c.vision_patch_bias))
        self.projector = MLPProjector(c.vision_width, c.lm.width, act=c.projector_act)  # linear_1, act, linear_2
        self.language_model = _build_lm(c)
        self.stage = 0
        self.configure_stage(2)

    # --- the two training stages ------------------------------------------------------------------------------
    def configure_stage(self, stage: int) -> "LLaVA":
        """Stage 1 (feature alignment): only the projector learns. Stage 2 (instruction tuning): projector + LM.
        The vision tower is frozen in both (requires_grad False, eval mode)."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        self.stage = stage
        self.vision_tower.requires_grad_(False)
        self.projector.requires_grad_(True)
        self.language_model.requires_grad_(stage == 2)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "LLaVA":
        """Like ``nn.Module.train``; frozen parts stay in eval mode."""
        super().train(mode)
        self.vision_tower.eval()
        if self.stage == 1:
            self.language_model.eval()
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    # --- images -> LM tokens ------------------------------------------------------------------------------------
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """``(m, 3, H, W)`` -> the selected hidden state of the vision tower ``(m, p, c)`` (no post-LN)."""
        check_pixel_values(pixel_values, self.config.image_size)
        c, vt = self.config, self.vision_tower
        upto = c.vision_feature_layer % (c.vision_layers + 1)  # index into [embeddings, block_1, ..., block_L]
        with torch.no_grad():  # frozen in both stages
            x = vt.embed(pixel_values)  # (m, 1 + g*g, c)
            for block in vt.encoder.blocks[:upto]:
                x = block(x)
        return x[:, 1:] if c.vision_feature_select == "default" else x  # (m, p, c)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """``(m, 3, H, W)`` -> projected image tokens ``(m, p, D)``."""
        return self.projector(self.image_features(pixel_values))

    def load_vision_tower(self, vit: ViT) -> "LLaVA":
        """Copy a trained lab ``ViT`` (``CoCa.visual``, ``CLIP.visual``) into the vision tower."""
        if not isinstance(vit, ViT):
            raise TypeError(f"vit must be a vlm_lab.nn.ViT, got {type(vit).__name__}")
        mine, theirs = self.vision_tower.config, vit.config
        diffs = [f"{f}: {getattr(theirs, f)} vs {getattr(mine, f)}" for f in ("image_size", "patch_size", "width",
                 "layers", "heads", "mlp_dim", "act", "ln_pre", "patch_bias") if getattr(mine, f) != getattr(theirs, f)]
        if diffs:
            raise ValueError("vit does not match this LLaVA's vision config (given vs expected): " + "; ".join(diffs))
        self.vision_tower.load_state_dict(vit.state_dict())
        return self

    # --- splicing ---------------------------------------------------------------------------------------------
    def splice(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
               image_embeds: Tensor | None = None, *, padding_side: str = "right"
               ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Replace every ``<image>`` placeholder of ``input_ids (b, n)`` by the next image's ``p`` tokens of
        ``image_embeds (m, p, D)`` (reading order): ``(inputs_embeds (b, t, D), attention_mask (b, t), labels)``.

        Padding (``attention_mask == 0``) is removed per row before splicing and added back on ``padding_side``.
        """
        c = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, tokens), got {getattr(input_ids, 'shape', input_ids)}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape or (labels is not None and labels.shape != input_ids.shape):
            raise ValueError(f"attention_mask and labels must have the shape of input_ids {tuple(input_ids.shape)}")
        is_img = (input_ids == c.image_token_id) & attention_mask.bool()  # (b, n)
        m = int(is_img.sum())
        m_given = 0 if image_embeds is None else image_embeds.shape[0]
        if m != m_given:
            raise ValueError(f"input_ids hold {m} {c.image_token_id!r} (<image>) placeholders but {m_given} images "
                             "were given; give one image per placeholder, in reading order")
        table = self.language_model.get_input_embeddings()
        safe = input_ids.masked_fill(input_ids == c.image_token_id, 0)  # the placeholder row is never used
        text = table(safe)  # (b, n, D)
        rows, row_labels = [], []
        k = 0
        for i in range(input_ids.shape[0]):
            keep = attention_mask[i].bool()
            emb_i, img_i = text[i][keep], is_img[i][keep]  # (n_i, D), (n_i,)
            lab_i = labels[i][keep] if labels is not None else None
            pos = img_i.nonzero().flatten().tolist()
            parts, lparts, start = [], [], 0
            for q in pos:
                parts += [emb_i[start:q], image_embeds[k].to(emb_i.dtype)]  # text before, then (p, D)
                if lab_i is not None:
                    lparts += [lab_i[start:q], lab_i.new_full((image_embeds.shape[1],), IGNORE_INDEX)]
                start, k = q + 1, k + 1
            parts.append(emb_i[start:])
            rows.append(torch.cat(parts, dim=0))  # (t_i, D)
            if lab_i is not None:
                lparts.append(lab_i[start:])
                row_labels.append(torch.cat(lparts))
        t = max(r.shape[0] for r in rows)
        if t > c.lm.max_positions:
            raise ValueError(f"a spliced conversation has {t} positions but the LM takes at most "
                             f"{c.lm.max_positions} (lm.max_positions); shorten it or use fewer images")
        b, d = len(rows), text.shape[-1]
        embeds = text.new_zeros(b, t, d)  # (b, t, D)
        mask = attention_mask.new_zeros(b, t)  # (b, t)
        out_labels = None if labels is None else labels.new_full((b, t), IGNORE_INDEX)  # (b, t)
        for i, r in enumerate(rows):
            sl = slice(t - r.shape[0], t) if padding_side == "left" else slice(0, r.shape[0])
            embeds[i, sl] = r
            mask[i, sl] = 1
            if out_labels is not None:
                out_labels[i, sl] = row_labels[i]
        return embeds, mask, out_labels

    # --- training / scoring -----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> LLaVAOutput:
        """``batch``: ``input_ids (b, n)`` with one placeholder per image, optional ``attention_mask``, ``labels``
        (``-100`` = not learned) and ``pixel_values (m, 3, H, W)`` (one image per placeholder, reading order)."""
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError("batch must be a dict with at least 'input_ids' (see collate_conversations)")
        pv = batch.get("pixel_values")
        image_embeds = self.encode_images(pv) if pv is not None and pv.shape[0] > 0 else None
        embeds, mask, labels = self.splice(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"),
                                           image_embeds)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, t): positions of real tokens count from 0
        logits = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits
        loss = lm_loss(logits, labels) if labels is not None else None
        return LLaVAOutput(loss=loss, logits=logits, labels=labels, attention_mask=mask, image_embeds=image_embeds)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                 *, max_new_tokens: int = 32, **generate_kwargs: Any) -> Tensor:
        """Greedy (by default) continuation of prompts ending with ``" ASSISTANT:"``: new token ids ``(b, k)``.
        Prompts are spliced and left-padded; extra keyword arguments go to ``transformers``' ``generate``."""
        lmc = self.config.lm
        image_embeds = self.encode_images(pixel_values) if pixel_values is not None and len(pixel_values) else None
        embeds, mask, _ = self.splice(input_ids, attention_mask, None, image_embeds, padding_side="left")
        if embeds.shape[1] + max_new_tokens > lmc.max_positions:
            raise ValueError(f"max_new_tokens: prompt ({embeds.shape[1]}) + {max_new_tokens} new tokens exceed the "
                             f"LM's {lmc.max_positions} positions")
        kw = dict(do_sample=False, num_beams=1)
        kw.update(generate_kwargs)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                            eos_token_id=lmc.eos_token_id, pad_token_id=lmc.pad_token_id,
                                            bos_token_id=lmc.bos_token_id, **kw)

    @torch.no_grad()
    def answer(self, tokenizer: Any, questions: Sequence[str], images: Sequence[Tensor | None] | None = None,
               template: ConversationTemplate | None = None, *, max_new_tokens: int = 32) -> list[str]:
        """One-turn answers to ``questions``; ``images[i]`` is None, one ``(3, H, W)`` image or ``(k, 3, H, W)``
        images, whose placeholders are put in front of the question (``"<image>\\n" * k + question``)."""
        template = template or ConversationTemplate.toy()
        images = list(images) if images is not None else [None] * len(questions)
        if len(images) != len(questions):
            raise ValueError(f"images: {len(images)} entries for {len(questions)} questions")
        encs, pix = [], []
        for q, im in zip(questions, images):
            if im is not None and im.dim() == 3:
                im = im[None]  # (3, H, W) -> (1, 3, H, W)
            k = 0 if im is None else im.shape[0]
            text = f"{template.image_token}\n" * k + q
            encs.append({"input_ids": tokenize_conversation([(text, None)], tokenizer, template)["input_ids"]})
            if k:
                pix.append(im)
        batch = collate_conversations(encs, self.config.lm.pad_token_id, padding_side="left")
        pv = torch.cat(pix) if pix else None
        was = self.training
        self.eval()
        try:
            out = self.generate(batch["input_ids"], batch["attention_mask"], pv, max_new_tokens=max_new_tokens)
        finally:
            self.train(was)
        return [s.strip() for s in tokenizer.batch_decode(out, skip_special_tokens=True)]

    # --- interop ----------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "LLaVA":
        """A lab LLaVA with the weights of a transformers ``LlavaForConditionalGeneration`` whose vision tower is
        a CLIP vision model and whose text model is a Llama or OPT decoder (any size)."""
        hc = getattr(hf_model, "config", None)
        if hc is None or getattr(hc, "model_type", "") != "llava":
            raise TypeError("hf_model must be a transformers LlavaForConditionalGeneration, "
                            f"got {type(hf_model).__name__}")
        v, tc = hc.vision_config, hc.text_config
        if getattr(v, "model_type", "") not in ("clip_vision_model",):
            raise ValueError(f"only CLIP vision towers are supported, got {getattr(v, 'model_type', None)!r}")
        layer = hc.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"only one vision_feature_layer is supported, got {layer!r}")
        if not getattr(hc, "multimodal_projector_bias", True):
            raise ValueError("only projectors with biases are supported (multimodal_projector_bias=True)")
        from .lm import lm_config_from_hf

        lm = lm_config_from_hf(tc)
        config = LLaVAConfig(
            image_size=v.image_size, patch_size=v.patch_size, vision_width=v.hidden_size,
            vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads, vision_mlp_dim=v.intermediate_size,
            vision_act=v.hidden_act, vision_ln_pre=True, vision_patch_bias=False, vision_ln_eps=v.layer_norm_eps,
            vision_feature_layer=layer, vision_feature_select=hc.vision_feature_select_strategy,
            projector_act=hc.projector_hidden_act, lm=lm,
            tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)
                                     or getattr(hc, "tie_word_embeddings", False)),
            image_token_id=hc.image_token_id)
        model = cls(config)
        vl = r"^model\.vision_tower\.(?:vision_model\.)?"
        rules = [
            (vl + r"embeddings\.patch_embedding\.", "vision_tower.patch_embed.proj."),
            (vl + r"embeddings\.class_embedding$", "vision_tower.class_embedding"),
            (vl + r"embeddings\.position_embedding\.weight$", "vision_tower.position_embedding"),
            (vl + r"pre_layrnorm\.", "vision_tower.ln_pre."),
            (vl + r"post_layernorm\.", "vision_tower.ln_post."),
            (vl + r"encoder\.layers\.(\d+)\.self_attn\.", r"vision_tower.encoder.blocks.\1.attn."),
            (vl + r"encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"vision_tower.encoder.blocks.\1.norm\2."),
            (vl + r"encoder\.layers\.(\d+)\.mlp\.", r"vision_tower.encoder.blocks.\1.mlp."),
            (r"^model\.multi_modal_projector\.", "projector."),
            (r"^model\.language_model\.", "language_model.model."),
            (r"^lm_head\.", "language_model.lm_head."),
        ]
        state = rename_keys(dict(hf_model.state_dict()), rules, drop=[r"position_ids$"])
        if config.tie_word_embeddings:
            state.pop("language_model.lm_head.weight", None)
            if "language_model.lm_head.weight" in model.state_dict():
                state["language_model.lm_head.weight"] = state[_embed_key(state)]
        load_converted(model, state, source=f"transformers {type(hf_model).__name__}")
        return model.to(next(hf_model.parameters()).dtype)

    def extra_repr(self) -> str:
        return f"stage={self.stage}, image_tokens={self.config.num_image_tokens}"


def _embed_key(state: dict[str, Tensor]) -> str:
    for k in ("language_model.model.embed_tokens.weight", "language_model.model.decoder.embed_tokens.weight"):
        if k in state:
            return k
    raise KeyError("no token embedding table in the converted state dict")
