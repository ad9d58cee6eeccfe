"""Reading and writing WARC/WET files with fastwarc, decompressing through xopen (gzip, zstd, bz2, ...).

A crawl file can end mid-record (an interrupted download) or mid-gzip-member. Reading then stops at the damage,
keeps every complete record before it, and counts the rest as truncated instead of raising.
"""

from __future__ import annotations

import os
import uuid
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from fastwarc.warc import ArchiveIterator, WarcRecord, WarcRecordType
from xopen import xopen

from cs336_data.document import Document

RECORD_TYPES = {"conversion": WarcRecordType.conversion, "response": WarcRecordType.response,
                "resource": WarcRecordType.resource, "warcinfo": WarcRecordType.warcinfo}


class _EndAtDamage:
    """A read-only stream that turns a decompression error into end-of-file and remembers that it happened."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.damaged: str | None = None
        self.pos = 0

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        """Read in 8 KiB pieces so that the bytes before a damaged spot still reach the parser."""
        if self.damaged:
            return b""
        want = n if n is not None and n >= 0 else 1 << 62
        parts: list[bytes] = []
        got = 0
        while got < want:
            try:
                piece = self.raw.read(min(8192, want - got))
            except (EOFError, zlib.error, OSError) as exc:
                self.damaged = f"{type(exc).__name__}: {exc}"
                break
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        self.pos += got
        return b"".join(parts)


def _complete(record: WarcRecord, body: bytes) -> bool:
    """A record cut short lacks its Content-Length header or has fewer body bytes than it declares."""
    declared = record.headers.get("Content-Length")
    return declared is not None and declared.strip().isdigit() and len(body) == record.content_length


def iter_warc_documents(path: str | os.PathLike, kind: str = "conversion",
                        stats: Counter[str] | None = None) -> Iterator[Document]:
    """Documents of one WARC/WET file: `conversion` records give text, `response` records give `meta['html']`.

    `stats` (if given) counts `records`, `truncated`, `invalid`, `non_html` and `damaged_stream`.
    """
    if kind not in ("conversion", "response"):
        raise ValueError(f"kind must be 'conversion' (WET) or 'response' (WARC), got {kind!r}")
    stats = stats if stats is not None else Counter()
    with xopen(path, "rb", threads=0) as raw:  # in-process decompression: errors surface where they occur
        stream = _EndAtDamage(raw)
        iterator = ArchiveIterator(stream, record_types=RECORD_TYPES[kind], parse_http=(kind == "response"),
                                   stream_detect=False)
        while True:
            try:
                record = next(iterator)
            except StopIteration:
                break
            except OSError:  # not a WARC at all, or a header mangled mid-file: keep what came before
                stats["invalid"] += 1
                break
            body = record.reader.read()
            if not _complete(record, body):
                stats["truncated"] += 1
                break
            stats["records"] += 1
            doc = Document(text="", id=record.headers.get("WARC-Record-ID", ""),
                           url=record.headers.get("WARC-Target-URI", ""))
            if kind == "conversion":
                doc.text = body.decode("utf-8", errors="replace")
            else:
                ctype = (record.http_content_type or "").lower()
                if ctype and "html" not in ctype:
                    stats["non_html"] += 1
                    continue
                doc.meta["html"] = body
            yield doc
        if stream.damaged:
            stats["damaged_stream"] += 1


def _new_record(record_type: WarcRecordType, url: str, content: bytes, content_type: str) -> WarcRecord:
    record = WarcRecord()
    record.init_headers(record_type=record_type, record_urn=f"uuid:{uuid.uuid4()}".encode())
    if url:
        record.headers["WARC-Target-URI"] = url
    record.headers["Content-Type"] = content_type
    record.set_bytes_content(content)
    return record


def write_wet(path: str | os.PathLike, docs: Iterable[Document]) -> int:
    """Write documents as WET `conversion` records (gzip when the name ends in .gz); returns the count."""
    n = 0
    with xopen(path, "wb", threads=0) as out:
        for doc in docs:
            _new_record(WarcRecordType.conversion, doc.url, doc.text.encode("utf-8"), "text/plain").write(out)
            n += 1
    return n


def write_warc_responses(path: str | os.PathLike, pages: Iterable[tuple[str, bytes, str]]) -> int:
    """Write (url, body bytes, content type) as WARC `response` records with a minimal HTTP/1.1 header."""
    n = 0
    with xopen(path, "wb", threads=0) as out:
        for url, body, ctype in pages:
            http = (f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            _new_record(WarcRecordType.response, url, http + body, "application/http; msgtype=response").write(out)
            n += 1
    return n
