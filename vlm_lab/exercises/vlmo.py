"""Chapter 05 (VLMo) checker: the mixture-of-modality-experts routing table written by hand.

    def my_route(block, vl_start, modality):   # block index 0..depth-1; modality "image" | "text" | "vl"
        ...
        return "image" | "text" | "vl" | "split"

``"split"`` means: the text part of an image-text input goes to the language expert and the image part to
the vision expert (a bottom block); ``"vl"`` means every token goes to the vision-language expert (a top
block, ``block >= vl_start``). The reference is ``MoMEBlock.route`` (:mod:`vlm_lab.nn.experts`), which the
VLMo model builds with ``with_vl_expert = block >= vl_start``.
"""

from __future__ import annotations

from typing import Any, Callable

from .core import CheckResult

__all__ = ["check_route"]

MODALITIES = ("image", "text", "vl")


def reference_route(block: int, vl_start: int, modality: str) -> str:
    """The expert(s) VLMo's block ``block`` uses for ``modality`` (the same rule as ``MoMEBlock.route``)."""
    if modality == "vl":
        return "vl" if block >= vl_start else "split"
    return modality


def check_route(fn: Callable[[int, int, str], Any], depth: int = 12, vl_start: int = 10) -> CheckResult:
    """Check ``fn(block, vl_start, modality)`` on every block of a ``depth``-block VLMo and on the extremes
    ``vl_start = 0`` (all blocks fused) and ``vl_start = depth`` (no VL expert)."""
    name = "my_route"
    if not callable(fn):
        raise TypeError(f"fn: expected your function, got {type(fn).__name__}")
    if not 0 <= vl_start <= depth:
        raise ValueError(f"vl_start must lie in [0, depth={depth}], got {vl_start}")
    for start in (vl_start, 0, depth):
        for block in range(depth):
            for modality in MODALITIES:
                want = reference_route(block, start, modality)
                try:
                    got = fn(block, start, modality)
                except NotImplementedError:
                    return CheckResult(False, "not implemented yet: replace the `raise NotImplementedError` with your "
                                              "code.", name)
                except Exception as err:  # the learner's bug, reported, not raised
                    return CheckResult(False, f"my_route({block}, {start}, {modality!r}) raised "
                                              f"{type(err).__name__}: {err}", name)
                if got == want:
                    continue
                where = f"block {block} of {depth} with vl_start={start}, modality {modality!r}"
                if modality != "vl":
                    hint = ("an image-only or text-only input never uses the vision-language expert: each modality "
                            "keeps its own FFN in every block.")
                elif want == "vl":
                    hint = "blocks from vl_start upwards send the whole image-text sequence to the VL expert."
                else:
                    hint = ("below vl_start an image-text input is split: text tokens to the language expert, image "
                            "tokens to the vision expert.")
                return CheckResult(False, f"{where}: got {got!r}. Hint: {hint}", name,
                                   {"block": block, "vl_start": start, "modality": modality, "got": got})
    return CheckResult(True, f"matches VLMo's routing on all {depth} blocks for vl_start = {vl_start}, 0 and {depth}.",
                       name)
