"""GPT-2's tokenizer: byte-level BPE written from scratch, plus a char-level one. Needs no torch.

    >>> tok = Tokenizer.gpt2()
    >>> tok.encode("Hello world"), tok.decode([15496, 995])
    ([15496, 995], 'Hello world')

The package, bottom up (each module imports only those above it in this list):

    pretokenize.py     text -> pieces: GPT-2's regex, safe cut points, special tokens split off
    byte_map.py        the 256 bytes <-> printable characters of GPT-2's vocabulary files
    merges.py          the merge loop (`bpe`) and merge tables; merges recovered from tiktoken ranks
    pool.py            the one process pool that tokenizes (encode_batch, encode(num_workers=...), prepare)
    base.py            what both tokenizers share: encode with special tokens, batches, decode checks
    formats.py         tokenizer files (tiktoken, vocab.json + merges.txt, tokenizer.json), GPT-2's vocabulary
    bpe_tokenizer.py   `Tokenizer`: byte-level BPE with its piece cache, loading and saving
    char_tokenizer.py  `CharTokenizer`: one id per character
    training.py        `train_bpe`: count pieces, learn merges
    load.py            `load_tokenizer(spec)`: 'gpt2', a directory or a .tiktoken file

This file only re-exports; docs/tokenizer.md explains the algorithm and the file formats.
"""

from gpt2lab.tokenizer.bpe_tokenizer import Tokenizer
from gpt2lab.tokenizer.byte_map import bytes_to_unicode
from gpt2lab.tokenizer.char_tokenizer import CharTokenizer
from gpt2lab.tokenizer.formats import (
    BPE_FILES,
    CHAR_FILE,
    CHAR_FORMAT,
    CHAR_FORMAT_VERSION,
    GPT2_MERGES_SHA256,
    GPT2_PYPI,
    GPT2_RANKS_SHA256,
    GPT2_RANKS_URL,
    GPT2_VOCAB_JSON_SHA256,
    TOKENIZER_FILES,
    read_tiktoken_ranks,
)
from gpt2lab.tokenizer.load import load_tokenizer
from gpt2lab.tokenizer.merges import Ranks, bpe, derive_merges
from gpt2lab.tokenizer.pool import tokenizer_pool
from gpt2lab.tokenizer.pretokenize import EOT, GPT2_PATTERN, AllowedSpecial, split_text
from gpt2lab.tokenizer.training import count_pieces, learn_merges, train_bpe

__all__ = [
    "CharTokenizer",
    "EOT",
    "GPT2_PATTERN",
    "Tokenizer",
    "bpe",
    "bytes_to_unicode",
    "count_pieces",
    "derive_merges",
    "learn_merges",
    "load_tokenizer",
    "read_tiktoken_ranks",
    "split_text",
    "tokenizer_pool",
    "train_bpe",
]
