"""HTML bytes to plain text: decode with the right encoding, then resiliparse's main-text extraction.

Web pages are mostly UTF-8 but not always; UTF-8 is tried first (strict), then resiliparse's detector. Input that
decodes to mostly control characters is binary (an image, a PDF) and yields None rather than garbage text.
"""

from __future__ import annotations

import codecs

from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import detect_encoding

from cs336_data.document import Document, Step

_ALLOWED_CONTROL = {"\t", "\n", "\r", "\f", "\v"}
_BOMS = [(codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")]


def looks_binary(text: str, limit: float = 0.1) -> bool:
    """True when over `limit` of the first 4096 characters are control characters (or U+FFFD from bad bytes)."""
    head = text[:4096]
    if not head:
        return False
    bad = sum(1 for c in head if (ord(c) < 32 and c not in _ALLOWED_CONTROL) or c == "\ufffd")
    return bad / len(head) > limit


def decode_html_bytes(data: bytes) -> str | None:
    """Bytes to str: a byte-order mark decides, else strict UTF-8, else the detected encoding (with replacement).

    Returns None for binary content.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return _text_or_none(data[len(bom):].decode(codec, errors="replace"))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        encoding = detect_encoding(data) or "cp1252"
        try:
            text = data.decode(encoding, errors="replace")
        except LookupError:  # a detector answer Python does not know
            text = data.decode("cp1252", errors="replace")
    return _text_or_none(text)


def _text_or_none(text: str) -> str | None:
    return None if looks_binary(text) else text


def extract_text_from_html_bytes(html_bytes: bytes) -> str | None:
    """Plain text of an HTML page given as raw bytes, or None when the bytes are not text."""
    html = decode_html_bytes(html_bytes)
    if html is None:
        return None
    return extract_plain_text(html)


class ExtractText(Step):
    """Turns a document whose `meta['html']` holds raw bytes into its extracted text; drops binary or empty pages."""

    name = "extract"

    def apply(self, doc: Document) -> Document | None:
        raw = doc.meta.pop("html", None)
        if raw is None:
            return doc
        text = extract_text_from_html_bytes(raw)
        if text is None:
            self.counters["binary"] += 1
            return None
        if not text.strip():
            self.counters["empty"] += 1
            return None
        doc.text = text
        return doc
