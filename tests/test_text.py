"""Bytes to text with stop strings (`gpt2lab.text`): the assembler never splits a character or shows part of a stop
string, cuts at the first stop string, and says where each chunk's text starts.

Oracle: Python's own UTF-8 decoding of all the bytes at once (`bytes.decode("utf-8", "replace")`).
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from gpt2lab import text as text_module
from gpt2lab.text import TextAssembler, first_stop, held_back, text_pieces

EURO, EMOJI = "€".encode(), "🙂".encode()


def feed_all(assembler: TextAssembler, chunks) -> list[str]:
    """Every piece the assembler returns, feeds then finish, empty ones included."""
    return [assembler.feed(c) for c in chunks] + [assembler.finish()]


# ---------------------------------------------------------------------------------------------------- the helpers
def test_held_back_keeps_possible_stop_prefixes():
    assert held_back("Hello wor", ["world"]) == 3
    assert held_back("Hello", ["\n\n"]) == 0
    assert held_back("ab\n", ["\n\n", "b\nx"]) == 2
    assert held_back("", ["abc"]) == 0
    assert held_back("xx", []) == 0


def test_text_pieces_never_split_characters():
    emoji = "🙂".encode()
    chunks = [b"Hi ", emoji[:1], emoji[1:3], emoji[3:] + b" caf\xc3", b"\xa9"]
    pieces = list(text_pieces(chunks))
    assert "".join(pieces) == "Hi 🙂 café" and "\ufffd" not in "".join(pieces)
    assert pieces == ["Hi ", "🙂 caf", "é"]
    assert list(text_pieces([b"ok\xe2\x82"])) == ["ok", "\ufffd"]  # incomplete at the very end


def test_text_pieces_cut_stop_strings_cleanly():
    chunks = [b"one\n", b"two\n\n", b"three"]
    assert "".join(text_pieces(chunks, stops=["\n\n"])) == "one\ntwo"
    chunks = [b"Hello W", b"or", b"ld and more"]
    pieces = list(text_pieces(chunks, stops=["World"]))
    assert pieces == ["Hello "]
    assert "".join(text_pieces([b"a Wor", b"k"], stops=["World"])) == "a Work"  # a false start is released
    read = []

    def chunks_read():
        for c in [b"xSTO", b"P", b"never"]:
            read.append(c)
            yield c
    assert list(text_pieces(chunks_read(), stops=["STOP", "x"])) == []
    assert read == [b"xSTO"]  # stops reading at the first stop string


def test_first_stop_is_the_earliest_of_any():
    assert first_stop("a STOP b END", ["END", "STOP"]) == 2
    assert first_stop("abc", ["x"]) is None and first_stop("abc", []) is None


# ---------------------------------------------------------------------------------------------------- TextAssembler
def test_feed_returns_only_whole_characters():
    a = TextAssembler()
    assert [a.feed(c) for c in (b"caf", b"\xc3", b"\xa9 ", EMOJI[:2], EMOJI[2:])] == ["caf", "", "é ", "", "🙂"]
    assert (a.finish(), a.text, a.released, a.stopped, a.finished) == ("", "café 🙂", 6, False, True)


def test_finish_releases_held_back_text_and_a_dangling_byte():
    a = TextAssembler(stops=["world"])
    assert a.feed(b"Hello wor") == "Hello " and a.text == "Hello wor" and a.released == 6
    assert a.finish() == "wor" and not a.stopped
    a = TextAssembler()
    assert feed_all(a, [b"ok", EURO[:2]]) == ["ok", "", "\ufffd"] and a.text == "ok\ufffd"


def test_a_stop_string_split_over_chunks_cuts_the_text_and_ends_it():
    a = TextAssembler(stops=["END"])
    assert [a.feed(c) for c in (b"before E", b"N", b"D after")] == ["before ", "", ""]
    assert a.stopped and a.done and a.text == "before " and a.released == 7
    assert a.feed(b"more") == "" and a.finish() == "" and a.text == "before "  # nothing after the stop string
    a = TextAssembler(stops=["END"])
    assert feed_all(a, [b"EN", b"d"]) == ["", "ENd", ""] and not a.stopped  # released once ruled out


def test_the_stop_that_completes_first_wins():
    a = TextAssembler(stops=["abcd", "bc"])
    assert a.feed(b"abc") == "a" and a.stopped  # "bc" is complete before "abcd" could be
    a = TextAssembler(stops=["bc", "ab"])
    assert a.feed(b"xabc") == "x" and a.stopped  # in one chunk, the earliest start


def test_finish_cuts_at_a_stop_string_only_the_flush_completes():
    a = TextAssembler(stops=["a\ufffd"])
    assert feed_all(a, [b"xa", EURO[:1]]) == ["x", "", ""] and a.stopped and a.text == "x"


def test_chunk_start_is_where_each_chunks_text_starts():
    a = TextAssembler()
    starts = []
    for chunk in (b"a", EURO[:1], EURO[1:], b"b", EMOJI[:3], b"x", b"y"):
        a.feed(chunk)
        starts.append(a.chunk_start)
    # a chunk that completes a character starts at it; after a lone lead byte (U+FFFD) "x" starts after it
    assert a.text == "a€b\ufffdxy" and starts == [0, 1, 1, 2, 3, 4, 5]
    assert a.start_of(b"z") == 6 and a.chunk_start == 5  # start_of only looks ahead


@pytest.mark.parametrize("seed", range(5))
def test_random_chunks_match_decoding_all_the_bytes_at_once(seed):
    rng = random.Random(seed)
    data = "naïve café 🙂 — 漢字 ok END fin\n\n".encode() + bytes([0xE2, 0x41, 0xC3]) + "é".encode() + b"\xff tail"
    cuts = sorted(rng.sample(range(1, len(data)), 12))
    chunks = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)])]
    whole = data.decode("utf-8", errors="replace")
    assert "".join(text_pieces(chunks)) == whole
    for stops in (["END"], ["\n\n", "fé"], ["nothing"], ["\ufffdA"]):
        out = "".join(text_pieces(chunks, stops))
        cut = first_stop(whole, stops)
        assert out == (whole if cut is None else whole[:cut])
        a = TextAssembler(stops)
        pieces = feed_all(a, chunks)
        assert "".join(pieces) == out == a.text and a.released == len(out) and a.stopped == (cut is not None)
        assert not any(first_stop(p, stops) is not None for p in pieces)


def test_text_needs_no_torch():
    tree = ast.parse(Path(text_module.__file__).read_text())
    imported = {n.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for n in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "codecs", "typing"}, imported
