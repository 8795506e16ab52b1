"""Train a byte-level BPE tokenizer locally (no hub) and wrap it for ``transformers``.

Used for the tiny offline teacher: byte-level BPE never produces unknown tokens, so any
text (code, punctuation, non-ASCII) round-trips; one special token serves as EOS, BOS
and padding, like GPT-2's ``<|endoftext|>``.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import DataError

EOS_TOKEN = "<|endoftext|>"
_MIN_VOCAB = 257  # 256 byte symbols + the special token


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` entries when the corpus allows
    that many merges; EOS/BOS/PAD = ``<|endoftext|>`` (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < _MIN_VOCAB:
        raise DataError(f"tokenizer.vocab_size: must be >= {_MIN_VOCAB} for byte-level BPE, got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # Packed training never truncates; a large value keeps transformers from warning.
        model_max_length=1_000_000_000,
    )
