"""Data for the trial pipeline: text sources -> packed token blocks -> train/eval batches.

Sources are the built-in offline corpus (``pydoc_data.topics``), local files and Hugging
Face hub datasets (streaming). Batches are HF causal-LM dicts (``input_ids``,
``attention_mask``, ``labels``) and the train loaders resume exactly from ``state_dict()``.
"""

from .corpus import builtin_corpus
from .errors import DataError
from .loaders import BlockLoader, eval_batches
from .packing import TokenBlocks, build_blocks, split_train_eval
from .sources import SOURCES, load_texts, resolve_files
from .streaming import StreamingBlockLoader
from .tokenizer import EOS_TOKEN, train_bpe_tokenizer

__all__ = [
    "EOS_TOKEN",
    "SOURCES",
    "BlockLoader",
    "DataError",
    "StreamingBlockLoader",
    "TokenBlocks",
    "build_blocks",
    "builtin_corpus",
    "eval_batches",
    "load_texts",
    "resolve_files",
    "split_train_eval",
    "train_bpe_tokenizer",
]
