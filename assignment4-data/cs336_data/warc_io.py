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

from cs336_basics.cli_support import UserError
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

    `stats` (if given) counts `records`, `truncated`, `invalid`, `non_html` and `damaged_stream`, plus `empty`
    (not one record of either kind) and `other_kind` (records of the other kind: a WARC read as WET or the
    reverse), so that `damage` can tell a whole file from one that only looks empty.
    """
    if kind not in ("conversion", "response"):
        raise ValueError(f"kind must be 'conversion' (WET) or 'response' (WARC), got {kind!r}")
    stats = stats if stats is not None else Counter()
    wanted = RECORD_TYPES[kind]
    other = RECORD_TYPES["response" if kind == "conversion" else "conversion"]
    with xopen(path, "rb", threads=0) as raw:  # in-process decompression: errors surface where they occur
        stream = _EndAtDamage(raw)
        iterator = ArchiveIterator(stream, record_types=wanted | other, parse_http=(kind == "response"),
                                   stream_detect=False)
        while True:
            try:
                record = next(iterator)
            except StopIteration:
                break
            except OSError:  # not a WARC at all, or a header mangled mid-file: keep what came before
                stats["invalid"] += 1
                break
            if record.record_type != wanted:
                stats["other_kind"] += 1
                continue
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
        if not (stream.damaged or stats["records"] or stats["other_kind"] or stats["invalid"]):
            stats["empty"] += 1


def damage(stats: Counter[str] | dict[str, int], kind: str = "conversion") -> str | None:
    """Why a file read with `iter_warc_documents` is not whole (None when it is): damaged compression, a
    record cut short, bytes that are no WARC, no bytes at all, or only records of the other kind."""
    records = stats.get("records", 0)
    after = f"after {records} whole record{'s' if records != 1 else ''}"
    if stats.get("damaged_stream"):
        return f"damaged compressed stream (truncated or not gzip) {after}"
    if stats.get("truncated"):
        return f"a record is cut short {after}"
    if stats.get("invalid"):
        return f"not a WARC/WET file (invalid record header {after})"
    if stats.get("empty"):
        return "no WARC records (an empty file, or not a WARC/WET file)"
    if not records and stats.get("other_kind"):
        have, given, wanted = (("response", "WARC", "WET") if kind == "conversion" else ("conversion", "WET", "WARC"))
        return (f"no {kind} records, only {stats['other_kind']} {have} records: a {given} file where a {wanted} "
                "is expected")
    return None


def read_whole(path: str | os.PathLike, kind: str = "conversion",
               stats: Counter[str] | None = None) -> Iterator[Document]:
    """`iter_warc_documents` for commands that must not work on part of a file: after the last document, a
    damaged, empty or wrong-kind file raises a `UserError` naming it (the caller's output is then discarded)."""
    stats = stats if stats is not None else Counter()
    yield from iter_warc_documents(path, kind, stats)
    problem = damage(stats, kind)
    if problem:
        raise UserError(f"cannot read {os.fspath(path)}: {problem}")


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
