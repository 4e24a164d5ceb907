"""A small causal language model: the lab's offline stand-in for the "frozen LLM" of BLIP-2 and LLaVA.

BLIP-2 (Li et al., 2023) bridges a frozen image encoder to a *frozen* large language model (OPT-2.7B / 6.7B,
Flan-T5). Offline, the lab cannot download one, so it ships a tiny decoder of the same architecture family:

- the model is a Hugging Face ``OPTForCausalLM`` (or ``LlamaForCausalLM``) built from a config
  (``CausalLMConfig.toy()``), so the code that drives it is exactly the code that drives a real OPT or Llama;
- it was pre-trained briefly on the text of the shapes world ("a small red circle left of a large blue star")
  with a byte-level BPE tokenizer trained on the same text (``vlm_lab.data.tokenizers.train_bpe``), so it
  already "speaks shapes" before it ever sees an image -- the situation BLIP-2 starts from;
- the checkpoint lives in ``assets/lm-toy/`` (``model.safetensors`` + ``card.json`` + ``tokenizer/``, about 1.3 MB);
  ``assets/make_lm.py`` regenerates it (command in ``assets/README.md``); ``load_toy_lm()`` loads it offline.

Real LLM weights: ``load_pretrained_lm("facebook/opt-2.7b", allow_download=True)`` goes through
``transformers.AutoModelForCausalLM.from_pretrained`` -- the only function here that may touch the network,
and only when asked (``allow_download=False`` by default: a local folder or the local cache only).

``CausalLMConfig.paper("opt-2.7b")`` has the published OPT-2.7B dimensions (Zhang et al., 2022, Table 1:
32 layers, 32 heads, d_model 2560, FFN 10240; vocabulary 50272 as in the Hugging Face config), for tracing
BLIP-2 on the meta device without weights.

Shape letters: b batch, n tokens, d width, V vocabulary.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._config import config_from_dict

__all__ = ["CausalLMConfig", "build_causal_lm", "load_toy_lm", "load_pretrained_lm", "save_lm", "load_lm",
           "freeze", "TOY_LM_DIR"]

#: Where the shipped toy checkpoint lives (repository checkout; the wheel does not carry assets/).
TOY_LM_DIR = Path(__file__).resolve().parents[2] / "assets" / "lm-toy"

_ARCHS = ("opt", "llama")


@dataclass
class CausalLMConfig:
    """A decoder-only LM, turned into a transformers config by ``to_hf()``. Presets: ``toy()``, ``paper()``."""

    arch: str = "opt"  # "opt" (OPTForCausalLM, BLIP-2's LLM family) or "llama" (LlamaForCausalLM, LLaVA's)
    vocab_size: int = 50272  # token vocabulary V
    width: int = 2560  # hidden size d_LLM (what BLIP-2's projection maps the queries to)
    layers: int = 32  # decoder blocks
    heads: int = 32  # attention heads
    mlp_dim: int = 10240  # feed-forward hidden width
    max_positions: int = 2048  # longest sequence (queries + prompt + text)
    pad_token_id: int = 1  # padding id (OPT: 1)
    bos_token_id: int = 2  # begin-of-sequence id (OPT: 2, the same as </s>)
    eos_token_id: int = 2  # end-of-sequence id
    dropout: float = 0.0  # dropout inside the decoder (a frozen LLM is used in eval mode anyway)

    def __post_init__(self) -> None:
        if self.arch not in _ARCHS:
            raise ValueError(f"CausalLMConfig.arch must be one of {_ARCHS}, got {self.arch!r}")
        for name in ("vocab_size", "width", "layers", "heads", "mlp_dim", "max_positions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"CausalLMConfig.{name} must be a positive int, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"CausalLMConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if self.arch == "llama" and (self.width // self.heads) % 2:
            raise ValueError(f"CausalLMConfig: Llama's rotary embedding needs an even head width, got "
                             f"width / heads = {self.width // self.heads}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size:
                raise ValueError(f"CausalLMConfig.{name} must be in [0, vocab_size={self.vocab_size}), got {v}")

    @classmethod
    def toy(cls, **overrides: Any) -> "CausalLMConfig":
        """The shipped toy LM: OPT architecture, width 96, 3 layers, BPE vocabulary of 384 (ids as ``train_bpe``:
        ``<pad>=0, <s>=1, </s>=2``). About 0.3 M parameters."""
        base = dict(arch="opt", vocab_size=384, width=96, layers=3, heads=4, mlp_dim=256, max_positions=96,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, variant: str = "opt-2.7b", **overrides: Any) -> "CausalLMConfig":
        """Published LLM sizes used with BLIP-2 / medical VLMs (shapes only; use on the meta device):

        - ``opt-2.7b``: 32 layers, 32 heads, d 2560, FFN 10240, V 50272 (BLIP-2's smallest OPT);
        - ``opt-6.7b``: 32 layers, 32 heads, d 4096, FFN 16384;
        - ``llama-7b``: Llama architecture, 32 layers, 32 heads, d 4096, FFN 11008, V 32000 (the 4096-d LLM of
          medical variants such as the X-ray model of the study notes).
        """
        presets = {
            "opt-2.7b": dict(arch="opt", vocab_size=50272, width=2560, layers=32, heads=32, mlp_dim=10240),
            "opt-6.7b": dict(arch="opt", vocab_size=50272, width=4096, layers=32, heads=32, mlp_dim=16384),
            "llama-7b": dict(arch="llama", vocab_size=32000, width=4096, layers=32, heads=32, mlp_dim=11008,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2),
        }
        if variant not in presets:
            raise ValueError(f"variant must be one of {sorted(presets)}, got {variant!r}")
        return cls(**{**presets[variant], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CausalLMConfig":
        return config_from_dict(cls, d)

    def to_hf(self):
        """The equivalent transformers ``OPTConfig`` / ``LlamaConfig``."""
        if self.arch == "opt":
            from transformers import OPTConfig

            return OPTConfig(vocab_size=self.vocab_size, hidden_size=self.width, num_hidden_layers=self.layers,
                             num_attention_heads=self.heads, ffn_dim=self.mlp_dim,
                             max_position_embeddings=self.max_positions, word_embed_proj_dim=self.width,
                             dropout=self.dropout, attention_dropout=self.dropout, pad_token_id=self.pad_token_id,
                             bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
                             tie_word_embeddings=True)
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.width, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.heads,
                           intermediate_size=self.mlp_dim, max_position_embeddings=self.max_positions,
                           attention_dropout=self.dropout, pad_token_id=self.pad_token_id,
                           bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, tie_word_embeddings=True)


def lm_config_from_hf(tc: Any) -> CausalLMConfig:
    """The lab's ``CausalLMConfig`` for a transformers OPT or Llama text config (used by BLIP-2's and LLaVA's
    ``from_hf``)."""
    kind = getattr(tc, "model_type", "")
    if kind == "opt":
        if tc.word_embed_proj_dim != tc.hidden_size or not tc.do_layer_norm_before:
            raise ValueError("only OPT configs with word_embed_proj_dim == hidden_size and pre-LN are supported")
        return CausalLMConfig(arch="opt", vocab_size=tc.vocab_size, width=tc.hidden_size, layers=tc.num_hidden_layers,
                              heads=tc.num_attention_heads, mlp_dim=tc.ffn_dim, max_positions=tc.max_position_embeddings,
                              pad_token_id=tc.pad_token_id, bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id)
    if kind == "llama":
        return CausalLMConfig(arch="llama", vocab_size=tc.vocab_size, width=tc.hidden_size,
                              layers=tc.num_hidden_layers, heads=tc.num_attention_heads, mlp_dim=tc.intermediate_size,
                              max_positions=tc.max_position_embeddings, pad_token_id=tc.pad_token_id or 0,
                              bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id)
    raise ValueError(f"unsupported language model type {kind!r} (the lab loads OPT and Llama decoders)")


def build_causal_lm(config: CausalLMConfig) -> nn.Module:
    """A randomly initialised transformers causal LM (``OPTForCausalLM`` or ``LlamaForCausalLM``)."""
    if not isinstance(config, CausalLMConfig):
        raise TypeError(f"config must be a CausalLMConfig, got {type(config).__name__}")
    from transformers import LlamaForCausalLM, OPTForCausalLM

    hf = config.to_hf()
    cls = OPTForCausalLM if config.arch == "opt" else LlamaForCausalLM
    return cls(hf)


def freeze(module: nn.Module) -> nn.Module:
    """Freeze ``module`` in place (``requires_grad=False`` everywhere, eval mode) and return it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def save_lm(model: nn.Module, config: CausalLMConfig, out_dir: str | os.PathLike, tokenizer=None,
            card: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors``, ``card.json`` (config + ``card``) and, if given, ``tokenizer/`` to ``out_dir``."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_model(model, str(tmp))  # handles the tied input/output embedding (stored once)
    os.replace(tmp, out / "model.safetensors")
    record = {"model": "causal_lm", "config": asdict(config), **(card or {})}
    (out / "card.json").write_text(json.dumps(record, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / "tokenizer"))
    return out


def load_lm(path: str | os.PathLike, *, with_tokenizer: bool = True) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load a folder written by ``save_lm``: ``(model, tokenizer or None, card)``. Never touches the network."""
    from safetensors.torch import load_model

    p = Path(path)
    if not (p / "card.json").is_file() or not (p / "model.safetensors").is_file():
        raise FileNotFoundError(f"path: {str(p)!r} does not hold card.json + model.safetensors "
                                "(regenerate the toy LM with: python assets/make_lm.py assets/lm-toy)")
    card = json.loads((p / "card.json").read_text())
    config = CausalLMConfig.from_dict(card["config"])
    model = build_causal_lm(config)
    load_model(model, str(p / "model.safetensors"), strict=True)
    tokenizer = None
    if with_tokenizer and (p / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(p / "tokenizer"), local_files_only=True)
    return model.eval(), tokenizer, card


def load_toy_lm(path: str | os.PathLike | None = None, *, frozen: bool = True) -> tuple[nn.Module, Any]:
    """The shipped toy LM and its BPE tokenizer, frozen by default: ``(model, tokenizer)``."""
    model, tokenizer, _ = load_lm(TOY_LM_DIR if path is None else path)
    return (freeze(model) if frozen else model), tokenizer


def load_pretrained_lm(name_or_path: str, *, allow_download: bool = False, dtype: torch.dtype | None = None,
                       frozen: bool = True) -> tuple[nn.Module, Any]:
    """A real LLM (e.g. ``"facebook/opt-2.7b"``) through ``transformers``: ``(model, tokenizer)``.

    ``allow_download=False`` (default) reads only a local folder or the local Hugging Face cache; pass ``True``
    to allow the network (an explicit opt-in; several GB for OPT-2.7B).
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"name_or_path must be a model id or a local folder, got {name_or_path!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local_only = not allow_download
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=local_only, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_only)
    except OSError as e:
        hint = "" if allow_download else " (offline: pass allow_download=True to fetch it, or give a local folder)"
        raise OSError(f"could not load {name_or_path!r}{hint}: {e}") from e
    return (freeze(model) if frozen else model), tokenizer
