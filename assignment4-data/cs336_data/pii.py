"""Masking personal information: e-mail addresses, US phone numbers and IPv4 addresses.

Each masker returns (masked text, number of replacements) and uses the course's replacement strings. The patterns
favour precision on digits: phone numbers need a NANP area code (first digit 2-9) and may not sit inside a longer
digit run, and IPv4 octets must be 0-255 with no extra dotted number attached.
"""

from __future__ import annotations

import re

from cs336_data.document import Document, Step

EMAIL_TOKEN = "|||EMAIL_ADDRESS|||"
PHONE_TOKEN = "|||PHONE_NUMBER|||"
IP_TOKEN = "|||IP_ADDRESS|||"

EMAIL_RE = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w-])"
)
PHONE_RE = re.compile(
    r"(?<![\w+])(?:\+?1[\s.-]?)?"  # optional country code
    r"(?:\([2-9]\d{2}\)|[2-9]\d{2})"  # area code, bare or in parentheses
    r"[\s.-]?\d{3}[\s.-]?\d{4}"  # exchange and line number, optional separators
    r"(?![\d])(?!-\d)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4_RE = re.compile(rf"(?<![\d.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\d|\.\d)")


def mask_emails(text: str) -> tuple[str, int]:
    return EMAIL_RE.subn(EMAIL_TOKEN, text)


def mask_phone_numbers(text: str) -> tuple[str, int]:
    return PHONE_RE.subn(PHONE_TOKEN, text)


def mask_ips(text: str) -> tuple[str, int]:
    return IPV4_RE.subn(IP_TOKEN, text)


def mask_pii(text: str) -> tuple[str, dict[str, int]]:
    """All three maskers in turn (e-mails first, so their digits are not read as phones or IPs)."""
    counts = {}
    text, counts["emails"] = mask_emails(text)
    text, counts["phones"] = mask_phone_numbers(text)
    text, counts["ips"] = mask_ips(text)
    return text, counts


class MaskPII(Step):
    """Replaces PII in place and never drops a document; counts documents and spans masked per kind."""

    name = "mask_pii"

    def apply(self, doc: Document) -> Document | None:
        doc.text, counts = mask_pii(doc.text)
        for kind, n in counts.items():
            if n:
                self.counters[f"{kind}_masked"] += n
        doc.meta["pii"] = counts
        return doc
