"""Where a vision-language model spends its parameters and FLOPs: visual embedding, textual embedding, interaction.

ViLT (Kim et al., 2021, Figure 2) sorts VLMs by the relative size of three parts:

- **VE** visual embedding: everything that turns pixels into the vectors the interaction sees (patch projection,
  a ViT, a CNN + detector, a connector into another model's space);
- **TE** textual embedding: everything that turns words into vectors (a lookup table, a text transformer);
- **MI** modality interaction: where the two meet (a dot product in CLIP, cross-attention layers, a joint
  transformer over both sequences, the first layer of an MLP over concatenated vectors).

``taxonomy_split(model, batch)`` measures the three for any lab model: parameters by parameter name, FLOPs with
``torch.utils.flop_counter`` (via its per-module counts: a multiply-add is 2 FLOPs; only matrix products,
convolutions and attention are counted, as the counter does; embedding look-ups, norms, activations and softmax cost
0). PyTorch's counter has formulas for the CUDA attention kernels but not for the CPU one
(``_scaled_dot_product_flash_attention_for_cpu``), so attention would cost nothing on a CPU; ``taxonomy_split`` and
``count_flops`` add the same formula for it (QK^T and AV: 4 b h n m k). Task heads
(an answer classifier, a matching head's final layer) go to a fourth bucket, ``head``, which ViLT's figure leaves out.

Rules are per model class: an ordered list of ``(regex on the dotted module / parameter name, category)``; the first
match wins. FLOPs are counted per module *exclusively* (a module's count minus its children's) and each module's
share goes to the category of its own name, so a rule for a child beats its parent's. Compute that happens in the
model's own ``forward`` (outside any child module), and names that no rule matches, go to the class's ``default``. A model
class without rules is an error that says how to add them (``register_taxonomy_rules`` or a ``taxonomy_rules``
class attribute ``(rules, default)``).

The built-in rules, written down:

==================  ====================================  ==============================  ======================================
model               VE                                    TE                              MI (head)
==================  ====================================  ==============================  ======================================
CLIP                visual, visual_projection             text, text_projection           logit_scale + the similarity (forward)
EarlyFusion         patch_embed, image_position           text_embed                      type_embed, encoder (head)
IntermediateFusion  vision                                text                            fusion (head)
LateFusion          vision                                text                            combine, head.norm, head.mlp.linear_1
                                                                                          (head.mlp.linear_2)
ConnectorVQA        image_encoder, connector              text_embed                      type_embed, text (head)
DualEncoder         vision, image_proj                    text, text_proj                 fusion, logit_scale, sim. (itm_head)
ViLT                patch_proj, position_embeddings,      text_embed                      modality, encoder, pooler
                    cls_token                                                             (itm_head, mlm_head)
ALBEF               visual, vision_proj                   text.embeddings, text layers    text layers with cross-attention, temp
                                                          without cross-attention,        (itm_head, mlm_head)
                                                          text_proj
VLMo                patch_embed, image_position,          word_embeddings, text_position, blocks' attention / norm1 / mlp_vl /
                    cls_token, mask_token, blocks'        text_norm, blocks' mlp_text /   norm2_vl, modality, norm, pooler,
                    mlp_image / norm2_image, itc_image_   norm2_text, itc_text_proj       logit_scale (itm / mlm / mim heads)
                    proj
BLIP                visual, vision_proj                   text_encoder.embeddings,        text_encoder.layers (they cross-attend
                                                          text_proj                       in the ITM pass), text_decoder, temp
                                                                                          (itm_head, lm_head)
BLIP2               visual, vision_proj, language_        word_embeddings, position_      query_tokens, qformer, the rest of
                    projection                            embeddings, text_proj, the      language_model, temp (itm_head,
                                                          LLM's embed_tokens / positions  itg_head, language_model.lm_head)
CoCa                visual, pool_*, ln_*, proj_contrast   text, text_projection           decoder, logit_scale (decoder.lm_head)
LLaVA               vision_tower, projector               the LM's embed_tokens /         the rest of language_model
                                                          embed_positions                 (language_model.lm_head)
==================  ====================================  ==============================  ======================================

ALBEF's and BLIP's momentum copies (``*_m``) exist only for training and are left out of every count. A layer that
cross-attends to the image counts as interaction as a whole (ViLT's figure draws the fusion layers of a two-stream
model the same way), so BLIP, whose text encoder cross-attends in every layer of its ITM pass, is interaction-heavy
there. :func:`pair_forward` runs the pass that scores one image-text pair for every class above (the fusion models'
answer, CLIP's and the contrastive dual encoder's similarity, ITM for the matching dual encoders, ViLT, ALBEF,
VLMo (fusion mode), BLIP and BLIP-2, the caption scores for CoCa, the language model over ``[<image> tokens; words]``
for LLaVA), so that the chart compares like with like.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .trace import cpu_attention_flop_mapping

__all__ = ["CATEGORIES", "TaxonomySplit", "taxonomy_split", "register_taxonomy_rules", "taxonomy_rules", "pair_forward"]

VE, TE, MI, HEAD = "visual_embedding", "textual_embedding", "modality_interaction", "head"
CATEGORIES: tuple[str, ...] = (VE, TE, MI, HEAD)
SKIP = "skip"  # training-only parts (momentum encoders): in no category, counted nowhere
Rules = list[tuple[str, str]]
_MOMENTUM = (r"_m(\.|$)", SKIP)  # ALBEF / BLIP momentum copies: visual_m, text_m, text_encoder_m, ...


def _cross_attending_layers(stack: nn.Module) -> list[int]:
    """Indices of the layers of ``stack.layers`` that have a cross-attention block."""
    return [i for i, layer in enumerate(stack.layers) if getattr(layer, "cross_attn", None) is not None]


def _albef_rules(model: nn.Module) -> tuple[Rules, str]:
    fusion = "|".join(str(i) for i in _cross_attending_layers(model.text))  # ALBEF has >= 1 fusion layer
    return ([_MOMENTUM, (r"^visual(\.|$)", VE), (r"^vision_proj(\.|$)", VE), (rf"^text\.layers\.({fusion})(\.|$)", MI),
             (r"^text(\.|$)", TE), (r"^text_proj(\.|$)", TE), (r"^temp$", MI), (r"^(itm|mlm)_head(\.|$)", HEAD)], MI)

_RULES: dict[str, tuple[Rules, str]] = {
    "CLIP": ([(r"^visual(\.|$)", VE), (r"^visual_projection(\.|$)", VE), (r"^text(\.|$)", TE),
              (r"^text_projection(\.|$)", TE), (r"^logit_scale$", MI)], MI),
    "EarlyFusion": ([(r"^patch_embed(\.|$)", VE), (r"^image_position$", VE), (r"^text_embed(\.|$)", TE),
                     (r"^type_embed(\.|$)", MI), (r"^encoder(\.|$)", MI), (r"^head(\.|$)", HEAD)], MI),
    "IntermediateFusion": ([(r"^vision(\.|$)", VE), (r"^text(\.|$)", TE), (r"^fusion(\.|$)", MI),
                            (r"^head(\.|$)", HEAD)], MI),
    "LateFusion": ([(r"^vision(\.|$)", VE), (r"^text(\.|$)", TE), (r"^combine(\.|$)", MI),
                    (r"^head\.norm(\.|$)", MI), (r"^head\.mlp\.linear_1(\.|$)", MI), (r"^head(\.|$)", HEAD)], MI),
    "ConnectorVQA": ([(r"^image_encoder(\.|$)", VE), (r"^connector(\.|$)", VE), (r"^text_embed(\.|$)", TE),
                      (r"^type_embed(\.|$)", MI), (r"^text(\.|$)", MI), (r"^head(\.|$)", HEAD)], MI),
    "DualEncoder": ([(r"^vision(\.|$)", VE), (r"^image_proj(\.|$)", VE), (r"^text(\.|$)", TE),
                     (r"^text_proj(\.|$)", TE), (r"^fusion(\.|$)", MI), (r"^logit_scale$", MI),
                     (r"^itm_head(\.|$)", HEAD)], MI),
    "ViLT": ([(r"^patch_proj(\.|$)", VE), (r"^position_embeddings$", VE), (r"^cls_token$", VE),
              (r"^text_embed(\.|$)", TE), (r"^(modality|encoder|pooler)(\.|$)", MI),
              (r"^(itm|mlm)_head(\.|$)", HEAD)], MI),
    "ALBEF": _albef_rules,
    "VLMo": ([(r"^(patch_embed|image_position|cls_token|mask_token|itc_image_proj)(\.|$)", VE),
              (r"^blocks\.\d+\.(mlp_image|norm2_image)(\.|$)", VE),
              (r"^(word_embeddings|text_position|text_norm|itc_text_proj)(\.|$)", TE),
              (r"^blocks\.\d+\.(mlp_text|norm2_text)(\.|$)", TE),
              (r"^(blocks|modality|norm|pooler|logit_scale)(\.|$)", MI), (r"^(itm|mlm|mim)_head(\.|$)", HEAD)], MI),
    "BLIP": ([_MOMENTUM, (r"^visual(\.|$)", VE), (r"^vision_proj(\.|$)", VE), (r"^text_encoder\.embeddings(\.|$)", TE),
              (r"^text_encoder\.layers(\.|$)", MI), (r"^text_proj(\.|$)", TE), (r"^text_decoder(\.|$)", MI),
              (r"^temp$", MI), (r"^(itm|lm)_head(\.|$)", HEAD)], MI),
    "BLIP2": ([(r"^(visual|vision_proj|language_projection)(\.|$)", VE),
               (r"^(word_embeddings|position_embeddings|text_proj)(\.|$)", TE),
               (r"^language_model\..*embed_(tokens|positions)(\.|$)", TE),
               (r"^(query_tokens|qformer|temp)(\.|$)", MI), (r"^language_model\.lm_head(\.|$)", HEAD),
               (r"^language_model(\.|$)", MI), (r"^(itm|itg)_head(\.|$)", HEAD)], MI),
    "CoCa": ([(r"^(visual|pool_contrast|ln_contrast|pool_caption|ln_caption|proj_contrast)(\.|$)", VE),
              (r"^(text|text_projection)(\.|$)", TE), (r"^decoder\.lm_head(\.|$)", HEAD),
              (r"^(decoder|logit_scale)(\.|$)", MI)], MI),
    "LLaVA": ([(r"^(vision_tower|projector)(\.|$)", VE), (r"^language_model\..*embed_(tokens|positions)(\.|$)", TE),
               (r"^language_model\.lm_head(\.|$)", HEAD), (r"^language_model(\.|$)", MI)], MI),
}


def register_taxonomy_rules(class_name: str, rules: Rules, default: str = MI) -> None:
    """Add or replace the rules of a model class (by class name). ``rules``: ``[(regex, category), ...]``; the
    category ``"skip"`` leaves matching parameters and modules out of every count (training-only parts)."""
    if not isinstance(class_name, str) or not class_name:
        raise TypeError(f"class_name: expected a non-empty str, got {class_name!r}")
    for pattern, cat in list(rules) + [("", default)]:
        if cat not in CATEGORIES + (SKIP,):
            raise ValueError(f"rules: category must be one of {list(CATEGORIES) + [SKIP]}, got {cat!r}")
        re.compile(pattern)
    _RULES[class_name] = (list(rules), default)


def taxonomy_rules(model: nn.Module) -> tuple[Rules, str]:
    """The ``(rules, default)`` used for ``model`` (its ``taxonomy_rules`` attribute, else the registered ones)."""
    own = getattr(type(model), "taxonomy_rules", None)
    if own is not None:
        return list(own[0]), own[1]
    name = type(model).__name__
    if name not in _RULES:
        raise ValueError(f"model: no taxonomy rules for {name}; known classes: {sorted(_RULES)}. Add them with "
                         "vlm_lab.inspect.taxonomy.register_taxonomy_rules(name, [(regex, category), ...]) or a "
                         "class attribute taxonomy_rules = (rules, default)")
    rules = _RULES[name]
    return rules(model) if callable(rules) else rules


def _category(name: str, rules: Rules) -> str | None:
    for pattern, cat in rules:
        if re.search(pattern, name):
            return cat
    return None


@dataclass
class TaxonomySplit:
    """Parameters and FLOPs of one model, by category (keys: ``CATEGORIES``)."""

    model: str  # class name
    params: dict[str, int]  # parameters per category
    flops: dict[str, int]  # FLOPs of one forward pass of the given batch per category (empty without a batch)
    batch_size: int = 0  # images in the measured batch (0 without a batch)
    modules: dict[str, str] = field(default_factory=dict)  # top-most module / parameter name -> category

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    def share(self, what: str = "flops", include_head: bool = False) -> dict[str, float]:
        """Fractions of ``"flops"`` or ``"params"`` per category (VE / TE / MI, plus head when asked)."""
        if what not in ("flops", "params"):
            raise ValueError(f"what: expected 'flops' or 'params', got {what!r}")
        d = getattr(self, what)
        cats = CATEGORIES if include_head else CATEGORIES[:3]
        total = sum(d.get(c, 0) for c in cats)
        return {c: (d.get(c, 0) / total if total else 0.0) for c in cats}

    def as_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"model": self.model}
        for c in CATEGORIES:
            row[f"params_{c}"] = self.params.get(c, 0)
        for c in CATEGORIES:
            row[f"flops_{c}"] = self.flops.get(c, 0)
        return row


def taxonomy_split(model: nn.Module, batch: Any = None, *, forward: Callable[[nn.Module, Any], Any] | None = None,
                   ) -> TaxonomySplit:
    """Split ``model``'s parameters (and, given a ``batch``, one forward pass's FLOPs) into VE / TE / MI / head.

    Args:
        model: a lab model with taxonomy rules (see the module docstring).
        batch: the input of one forward pass (``model(batch)``, or ``forward(model, batch)`` when given); None counts
            parameters only. The pass runs in eval mode without gradients; the model's mode is restored.
        forward: how to call the model, e.g. ``lambda m, b: m.encode_image(b["pixel_values"])``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    rules, default = taxonomy_rules(model)
    params = {c: 0 for c in CATEGORIES}
    assigned: dict[str, str] = {}
    for name, p in model.named_parameters():
        cat = _category(name, rules) or default
        if cat == SKIP:
            continue
        params[cat] += p.numel()
        top = name.split(".")[0]
        assigned.setdefault(top if _category(top, rules) else name, cat)

    flops = {c: 0 for c in CATEGORIES} if batch is not None else {}
    bsz = 0
    if batch is not None:
        from torch.utils.flop_counter import FlopCounterMode

        was_training = model.training
        model.eval()
        # parameters stop requiring grad for the count: under no_grad a view of one (BLIP-2's expanded query tokens)
        # still says requires_grad but has no grad_fn, and the counter's module tracker fails on such inputs
        grads = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in grads:
            p.requires_grad_(False)
        try:
            if forward is not None:
                # run the custom pass *through* model.__call__ so the counter enters the root module first and names
                # its children "Root.child" (entered directly, they would be named by class and land in "Global")
                def entered(*_):
                    del model.forward  # a `forward` that calls model(...) itself gets the class's forward
                    return forward(model, batch)

                model.forward = entered  # instance attribute: shadows the class's forward for this one call
            with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_mapping()) as counter:
                model(batch)
        finally:
            model.__dict__.pop("forward", None)
            model.train(was_training)
            for p, flag in grads:
                p.requires_grad_(flag)
        counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
        root = type(model).__name__
        names = {k[len(root) + 1:]: v for k, v in counts.items() if k.startswith(root + ".")}
        # exclusive FLOPs of each module: its own count minus its direct children's; each goes to the category of
        # the module's own name, so a rule for a child (LateFusion's head.mlp.linear_1) beats its parent's
        child_sum: dict[str, int] = {}
        for name, v in names.items():
            parent = name
            while parent:  # the nearest *called* ancestor (a ModuleList is never called itself)
                parent = parent.rsplit(".", 1)[0] if "." in parent else ""
                if parent in names:
                    break
            child_sum[parent] = child_sum.get(parent, 0) + v
        for name, v in names.items():
            cat = _category(name, rules) or default
            if cat != SKIP:
                flops[cat] += v - child_sum.get(name, 0)
        flops[default] += max(counts.get("Global", 0) - child_sum.get("", 0), 0)  # the model's own forward
        pv = batch.get("pixel_values") if isinstance(batch, dict) else None
        bsz = int(pv.shape[0]) if isinstance(pv, torch.Tensor) else 0
    return TaxonomySplit(type(model).__name__, params, flops, bsz, assigned)


def pair_forward(model: nn.Module, batch: dict[str, Any]) -> Any:
    """Score one batch of image-text pairs the way ``model`` does at inference, for :func:`taxonomy_split`.

    ``batch`` holds ``pixel_values`` ``(b, 3, h, w)``, ``input_ids`` ``(b, n)`` (ids of the model's own vocabulary;
    LLaVA's must contain its ``<image>`` placeholder once per row) and optionally ``attention_mask`` ``(b, n)``. The
    pass is the one the module docstring names per class; momentum encoders and training losses are not run.
    """
    if not isinstance(batch, dict) or "pixel_values" not in batch or "input_ids" not in batch:
        raise ValueError("batch: expected a dict with 'pixel_values' and 'input_ids'")
    pv, ids, mask = batch["pixel_values"], batch["input_ids"], batch.get("attention_mask")
    name = type(model).__name__
    if name in ("EarlyFusion", "IntermediateFusion", "LateFusion", "ConnectorVQA"):
        return model({"pixel_values": pv, "input_ids": ids, "attention_mask": mask})
    if name == "DualEncoder" and model.config.matching:
        return model.match_score(pv, ids, mask)
    if name in ("CLIP", "DualEncoder"):
        return model.encode_image(pv) @ model.encode_text(ids, mask).T  # (b, b)
    if name == "CoCa":
        return model.caption_logits(pv, ids)  # image tower + unimodal text layers + multimodal decoder
    if name in ("ViLT", "VLMo"):
        return model.itm_scores(ids, pv, mask)  # VLMo: its fusion-encoder mode
    if name == "ALBEF":
        fused = model.fuse(model.encode_text(ids, mask), mask, model.encode_image(pv))  # (b, n, d)
        return model.itm_head(fused[:, 0])
    if name == "BLIP":
        return model.itm_probability(pv, ids, mask)
    if name == "BLIP2":
        if model.config.stage == 1:
            return model.itm_scores(pv, ids, mask)
        prompt = model.visual_prompt(pv)  # (b, q, D): ViT -> Q-Former -> projection
        text = model.language_model.get_input_embeddings()(ids)  # (b, n, D)
        mask = torch.ones_like(ids) if mask is None else mask
        full = torch.cat([torch.ones(prompt.shape[:2], dtype=mask.dtype), mask], dim=1)  # (b, q + n)
        return model.language_model(inputs_embeds=torch.cat([prompt, text], dim=1), attention_mask=full).logits
    if name == "LLaVA":
        return model({"pixel_values": pv, "input_ids": ids, "attention_mask": mask})
    raise ValueError(f"model: pair_forward knows no inference pass for {name}; pass forward= to taxonomy_split")
