"""Tokenizers trained offline with the Hugging Face ``tokenizers`` library, or loaded from a local folder.

Every tokenizer is a ``transformers.PreTrainedTokenizerFast`` that adds a begin and an end token around
each text, so text towers can pool at the first ``eos_token_id`` (CLIP) or at position 0 ([CLS], BERT):

- :func:`train_wordpiece`: BERT-style WordPiece. Specials ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3,
  [MASK]=4``; post-processor ``[CLS] $A [SEP]``; ``bos_token = cls_token = "[CLS]"`` and
  ``eos_token = sep_token = "[SEP]"``. Matches ``BertTokenizerFast``'s pipeline (BertNormalizer,
  BertPreTokenizer, ``##`` continuation prefix).
- :func:`train_bpe`: GPT-2 style byte-level BPE. Specials ``<pad>=0, <s>=1, </s>=2, <unk>=3`` then the
  extra ones (default ``<image>=4``, exposed as ``tokenizer.image_token``); post-processor
  ``<s> $A </s>``. Byte-level, so nothing is ever unknown.
- :func:`shapes_tokenizer`: a WordPiece built from :func:`vlm_lab.data.shapes.caption_corpus` (every
  template x colour x shape x size x relation, plus the question words the VQA tasks use), so no word of
  the shapes world -- held-out compositions included -- is ``[UNK]`` and each is a single token.
  Deterministic across processes (see its docstring for why it does not call the library trainer).

Token ids of :func:`train_wordpiece` are renumbered canonically (specials, then pieces sorted), but the
library trainer breaks ties between equally frequent merges in hash order, so on tiny corpora the set of
intermediate pieces can differ between processes. :func:`train_bpe` has been reproducible in our runs.
- :func:`load_tokenizer`: any local Hugging Face tokenizer folder, never the network.

Save with ``tokenizer.save_pretrained(dir)`` and load with :func:`load_tokenizer`. (In transformers 5,
``BertTokenizerFast(vocab_file=...)`` silently ignores the file; go through ``tokenizer_object`` /
``save_pretrained`` / ``AutoTokenizer`` as done here.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = ["train_wordpiece", "train_bpe", "shapes_tokenizer", "load_tokenizer", "WORDPIECE_SPECIALS", "BPE_SPECIALS"]

#: WordPiece special tokens, in id order.
WORDPIECE_SPECIALS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: Byte-level BPE special tokens, in id order (extra special tokens follow).
BPE_SPECIALS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts: expected an iterable of strings, got a single str")
    texts = list(texts)
    if not texts:
        raise ValueError("texts: expected at least one training text, got none")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts: item {i} is {type(t).__name__}, expected str")
    if not any(t.strip() for t in texts):
        raise ValueError("texts: all training texts are empty")
    return texts


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def train_wordpiece(
    texts: Iterable[str],
    vocab_size: int = 1000,
    model_max_length: int = 64,
    lowercase: bool = True,
    min_frequency: int = 1,
) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer on ``texts`` (offline, in memory).

    Args:
        texts: training texts.
        vocab_size: upper bound on the vocabulary, special tokens included.
        model_max_length: the ``model_max_length`` stored on the tokenizer (special tokens included).
        lowercase: lowercase (and strip accents of) the input, as ``bert-base-uncased`` does.
        min_frequency: minimum count of a merged piece.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``[PAD]=0``, ``bos == cls == [CLS]``, ``eos == sep == [SEP]``;
        ``tokenizer("a red circle").input_ids`` is ``[CLS] ... [SEP]``.
    """
    texts = _check_texts(texts)
    _check_int(vocab_size, "vocab_size", len(WORDPIECE_SPECIALS) + 1)
    _check_int(model_max_length, "model_max_length", 3)
    tok = _wordpiece_pipeline({"[UNK]": 0}, lowercase)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(WORDPIECE_SPECIALS), continuing_subword_prefix="##",
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # The trainer numbers tokens in hash order; renumber canonically (specials, then sorted pieces).
    return _wordpiece_fast(sorted(set(tok.get_vocab()) - set(WORDPIECE_SPECIALS)), lowercase, model_max_length)


def _wordpiece_pipeline(vocab: dict[str, int], lowercase: bool) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None if lowercase else False, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _wordpiece_fast(pieces: Sequence[str], lowercase: bool, model_max_length: int) -> PreTrainedTokenizerFast:
    """A BERT-style ``PreTrainedTokenizerFast`` whose vocabulary is the specials followed by ``pieces``."""
    vocab = {t: i for i, t in enumerate(list(WORDPIECE_SPECIALS) + [p for p in pieces if p not in WORDPIECE_SPECIALS])}
    tok = _wordpiece_pipeline(vocab, lowercase)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        bos_token="[CLS]", eos_token="[SEP]",
        do_lower_case=lowercase,
    )


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = 1000,
    model_max_length: int = 64,
    extra_special_tokens: Sequence[str] = ("<image>",),
    min_frequency: int = 1,
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer on ``texts`` (offline, in memory).

    Args:
        texts: training texts.
        vocab_size: upper bound on the vocabulary (>= 256 byte tokens + specials).
        model_max_length: the ``model_max_length`` stored on the tokenizer.
        extra_special_tokens: special tokens after ``<pad> <s> </s> <unk>`` (ids 4, 5, ...); never split.
            ``"<image>"`` is also exposed as ``tokenizer.image_token`` (LLaVA's placeholder).
        min_frequency: minimum count of a merge.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<pad>=0, <s>=1, </s>=2, <unk>=3`` adding ``<s> ... </s>``.
    """
    texts = _check_texts(texts)
    if isinstance(extra_special_tokens, str):
        raise TypeError("extra_special_tokens: expected a sequence of strings, got a single str")
    extras = list(extra_special_tokens)
    for t in extras:
        if not isinstance(t, str) or not t:
            raise ValueError(f"extra_special_tokens: expected non-empty strings, got {t!r}")
        if t in BPE_SPECIALS:
            raise ValueError(f"extra_special_tokens: {t!r} is already a built-in special token")
    specials = list(BPE_SPECIALS) + extras
    _check_int(vocab_size, "vocab_size", 256 + len(specials))
    _check_int(model_max_length, "model_max_length", 3)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id, eos_id = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1",
                                      special_tokens=[("<s>", bos_id), ("</s>", eos_id)]),
    ])
    kwargs = {"image_token": "<image>"} if "<image>" in extras else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens=extras,
        **kwargs,
    )


def shapes_tokenizer(model_max_length: int = 32) -> PreTrainedTokenizerFast:
    """WordPiece trained on the whole shapes-world vocabulary (captions and question words); deterministic.

    Every caption of :mod:`vlm_lab.data.shapes` (held-out compositions included) tokenises without
    ``[UNK]``, one token per word. About 190 tokens.
    """
    from .shapes import caption_corpus

    _check_int(model_max_length, "model_max_length", 3)
    # Train to convergence, written out: every word of the corpus becomes a piece, with single
    # characters (and their ## continuations) as the fallback. Building the vocabulary directly keeps
    # it identical across processes (the library trainer breaks ties between equally frequent merges
    # in hash order, so its intermediate pieces vary from run to run).
    splitter = _wordpiece_pipeline({"[UNK]": 0}, lowercase=True)
    words: set[str] = set()
    for text in caption_corpus():
        normalized = splitter.normalizer.normalize_str(text)
        words.update(w for w, _ in splitter.pre_tokenizer.pre_tokenize_str(normalized))
    chars = {c for w in words for c in w}
    pieces = sorted(chars) + sorted("##" + c for c in chars) + sorted(w for w in words if len(w) > 1)
    return _wordpiece_fast(pieces, lowercase=True, model_max_length=model_max_length)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a Hugging Face tokenizer saved in the local folder ``path`` (never touches the network).

    Raises:
        FileNotFoundError: ``path`` is not an existing folder (a hub id like ``"bert-base-uncased"`` is
            not downloaded: fetch it yourself and pass the folder).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a folder path (str or PathLike), got {type(path).__name__}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"path: tokenizer folder {str(p)!r} does not exist (load_tokenizer only reads local folders written "
            "by save_pretrained; it never downloads from the Hugging Face Hub)")
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"path: {str(p)!r} does not hold a loadable Hugging Face tokenizer ({exc})") from exc
