"""A word-level ``tokenizers`` tokenizer trained on the caption grammar, with T5's special ids.

Word level, because the grammar is a closed set of whole words: every word gets one id, and
a word the grammar never uses becomes ``<unk>`` (id 2) instead of a crash, so any prompt
still generates. Ids 0, 1, 2 are ``<pad>``, ``</s>``, ``<unk>`` exactly as in T5, and a
TemplateProcessing post-processor appends ``</s>``, which is what
``sorakit.tokenizer.PromptTokenizer`` expects.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 (T5)


def train_tokenizer(captions: Iterable[str], path: str | Path, vocab_size: int = 512) -> Path:
    """Train on ``captions`` and save a tokenizers JSON file at ``path``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(sorted(set(captions)), trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces when decoding
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
