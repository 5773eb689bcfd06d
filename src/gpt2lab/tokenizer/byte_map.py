"""GPT-2's map from the 256 byte values to printable characters, the alphabet of its vocabulary files."""

from __future__ import annotations


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to 256 printable characters, used only in vocab files.

    Why: vocab.json and merges.txt are text, space-separated. Raw bytes such as b" " or b"\\n" or half a UTF-8
    character cannot be written there, so each byte gets a visible stand-in. Bytes that are already printable
    (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) stand for themselves; the other 68 are shifted to U+0100 and up, in byte order.
    Hence the familiar 'Ġ' (U+0120) for a space and 'Ċ' for a newline:

        >>> bytes_to_unicode()[ord(" ")], bytes_to_unicode()[ord("\\n")]
        ('Ġ', 'Ċ')

    The dict's order (printable bytes first) is also the order of GPT-2's first 256 ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


_BYTE_TO_CHAR = bytes_to_unicode()
# str.translate tables, so converting a token is one C call: visible <-> latin-1 (whose code points are the bytes).
_FROM_VISIBLE = {ord(c): b for b, c in _BYTE_TO_CHAR.items()}
_FROM_VISIBLE.update({b: 0xFFFF for b in range(256) if b not in _FROM_VISIBLE})  # no stand-in: make latin-1 fail


def _to_visible(token: bytes) -> str:
    return token.decode("latin-1").translate(_BYTE_TO_CHAR)


def _from_visible(text: str) -> bytes | None:
    """Inverse of `_to_visible`; None if `text` has a character that stands for no byte."""
    try:
        return text.translate(_FROM_VISIBLE).encode("latin-1")
    except UnicodeEncodeError:
        return None
