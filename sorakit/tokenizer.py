"""Prompt tokenisation with T5 semantics, on the ``tokenizers`` library only (no torch).

T5's tokenizer appends EOS, truncates to ``max_length`` keeping room for EOS, and pads with 0.
Open-Sora pads every prompt to 300 tokens and passes the attention mask along. The same
tokenizer file drives the torch reference and the runtime, so both see identical ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sorakit.errors import SorakitError

log = logging.getLogger(__name__)


@dataclass
class TokenBatch:
    ids: np.ndarray  # [n, max_length] int64
    mask: np.ndarray  # [n, max_length] int64, 1 for real tokens (EOS included)
    truncated: list[bool]  # per prompt: was it cut to fit max_length?
    lengths: list[int]  # real tokens per prompt, EOS included
    unknown: list[int]  # per prompt: how many tokens were the unknown token


class PromptTokenizer:
    def __init__(self, tokenizer_file: str | Path, max_length: int, pad_id: int = 0, eos_id: int = 1):
        from tokenizers import Tokenizer

        path = Path(tokenizer_file)
        if not path.is_file():
            raise SorakitError(f"tokenizer file {path} does not exist")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
            raise SorakitError(f"{path} is not a tokenizers JSON file: {e}") from None
        self.tok.no_padding()
        self.tok.no_truncation()
        self.max_length, self.pad_id, self.eos_id = max_length, pad_id, eos_id
        self.unk_id = self._unk_id()

    def _unk_id(self) -> int | None:
        for name in ("<unk>", "[UNK]"):
            i = self.tok.token_to_id(name)
            if i is not None:
                return i
        return None

    def __call__(self, prompts: list[str]) -> TokenBatch:
        n, L = len(prompts), self.max_length
        ids = np.full((n, L), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, L), dtype=np.int64)
        truncated, lengths, unknown = [], [], []
        for i, enc in enumerate(self.tok.encode_batch(list(prompts), add_special_tokens=True)):
            seq = list(enc.ids)
            if not seq or seq[-1] != self.eos_id:
                seq.append(self.eos_id)
            cut = len(seq) > L
            if cut:
                seq = seq[: L - 1] + [self.eos_id]
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
            truncated.append(cut)
            lengths.append(len(seq))
            unknown.append(sum(1 for t in seq if t == self.unk_id))
        for p, cut in zip(prompts, truncated):
            if cut:
                log.info("prompt truncated to %d tokens: %.60s...", L, p)
        return TokenBatch(ids, mask, truncated, lengths, unknown)


def build_char_tokenizer(path: str | Path, alphabet: str | None = None) -> Path:
    """A deterministic character-level tokenizer with T5's special ids (pad 0, eos 1, unk 2).

    Used by presets that have no trained tokenizer (the tiny test preset).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    alphabet = alphabet or "abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'-"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "\u2581": 3}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
