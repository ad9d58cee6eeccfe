"""Extraction, PII masking and the Gopher rules on hand-checked inputs, including malformed and hostile ones."""

import pytest

from cs336_data.document import Document, run_steps, step_report
from cs336_data.extract import ExtractText, decode_html_bytes, extract_text_from_html_bytes
from cs336_data.gopher import GopherFilter, GopherRules, gopher_quality_filter, tokenize_words
from cs336_data.pii import EMAIL_TOKEN, IP_TOKEN, PHONE_TOKEN, MaskPII, mask_emails, mask_ips, mask_phone_numbers

# ---------------------------------------------------------------- extraction


def test_extract_drops_script_and_keeps_visible_text():
    html = b"<html><head><title>T</title><script>var x = 1;</script><style>p{}</style></head>" \
           b"<body><p>Hello <b>world</b></p></body></html>"
    text = extract_text_from_html_bytes(html)
    assert "Hello world" in text
    assert "var x" not in text and "p{}" not in text


def test_extract_survives_malformed_html():
    html = b"<div><p>unclosed <b>bold <i>italic</div></span></table><p>after <<>> &amp; &bogus; <"
    text = extract_text_from_html_bytes(html)
    assert "unclosed bold italic" in text
    assert "after" in text and "&" in text


@pytest.mark.parametrize("encoding, sample", [
    ("cp1252", "Café naïve résumé — “quoted” text about the crème brûlée served in the café."),
    ("cp1251", "Привет мир, как у вас дела сегодня? Это пример текста на русском языке."),
    ("shift_jis", "日本語のテキストです。これはエンコーディング検出のテストです。"),
    ("utf-16", "UTF-16 with a byte order mark: ünïcödé"),
])
def test_extract_detects_non_utf8_encodings(encoding, sample):
    html = f"<html><body><p>{sample}</p></body></html>".encode(encoding)
    assert extract_text_from_html_bytes(html).strip() == sample


def test_utf8_is_preferred_when_valid():
    assert decode_html_bytes("naïve ☃".encode()) == "naïve ☃"


def test_empty_and_binary_input():
    assert extract_text_from_html_bytes(b"") == ""
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
    assert extract_text_from_html_bytes(png) is None
    with pytest.raises(TypeError, match="expected bytes"):
        extract_text_from_html_bytes("<p>a str</p>")


def test_extract_step_counts_binary_and_empty():
    step = ExtractText()
    docs = [Document("", meta={"html": b"<p>fine text</p>"}), Document("", meta={"html": b"\x00\x01\x02" * 500}),
            Document("", meta={"html": b"<script>only()</script>"})]
    out = list(run_steps(docs, [step]))
    assert [d.text for d in out] == ["fine text"]
    assert step.counters["binary"] == 1 and step.counters["empty"] == 1 and step.counters["dropped"] == 2


# ---------------------------------------------------------------- PII


@pytest.mark.parametrize("text, expected, n", [
    ("write to a.b+tag@mail.example.co.uk today", f"write to {EMAIL_TOKEN} today", 1),
    ("x@y.io, first.last@sub-domain.org.", f"{EMAIL_TOKEN}, {EMAIL_TOKEN}.", 2),
    ("not mail: @handle, user@localhost, a@b", "not mail: @handle, user@localhost, a@b", 0),
    (f"already {EMAIL_TOKEN} masked", f"already {EMAIL_TOKEN} masked", 0),
])
def test_mask_emails(text, expected, n):
    assert mask_emails(text) == (expected, n)


@pytest.mark.parametrize("number", ["2831823829", "(283)-182-3829", "(283) 182 3829", "283-182-3829",
                                    "283.182.3829", "+1 283 182 3829", "1-800-555-0199", "+1 (415) 555-2671"])
def test_mask_phone_formats(number):
    assert mask_phone_numbers(f"call {number} now") == (f"call {PHONE_TOKEN} now", 1)


@pytest.mark.parametrize("text", ["order 12345678901234 shipped", "zip 94305-1234", "year 2024", "id 0123456789",
                                  "pi 3.141592653"])
def test_phone_false_positives_avoided(text):
    assert mask_phone_numbers(text) == (text, 0)


def test_mask_ips():
    text = "hosts 192.0.2.146, 10.0.0.1 and 255.255.255.255; not 256.1.1.1, 1.2.3.4.5 or 1.2.3"
    masked, n = mask_ips(text)
    assert n == 3
    assert masked == f"hosts {IP_TOKEN}, {IP_TOKEN} and {IP_TOKEN}; not 256.1.1.1, 1.2.3.4.5 or 1.2.3"


def test_mask_pii_step_counts():
    step = MaskPII()
    doc = step(Document("mail me@x.org or 283-182-3829 from 192.0.2.1"))
    assert doc.text == f"mail {EMAIL_TOKEN} or {PHONE_TOKEN} from {IP_TOKEN}"
    assert doc.meta["pii"] == {"emails": 1, "phones": 1, "ips": 1}
    assert step.counters["modified"] == 1 and step.counters["kept"] == 1


# ---------------------------------------------------------------- Gopher


def test_tokenizer_splits_punctuation_and_keeps_contractions():
    assert tokenize_words("Don't stop... well-known, ok?") == ["Don't", "stop", "...", "well-known", ",", "ok", "?"]


def test_gopher_rules_by_hand():
    rules = GopherRules()
    good = "The quick brown fox jumps over the lazy dog near the river bank. " * 6  # 13 words a sentence
    assert rules.failures(good) == []
    assert "word_count" in rules.failures("Too short.")
    assert "word_count" in rules.failures("word " * 100_001)
    assert "mean_word_length" in rules.failures("a an of to " * 30)
    assert "mean_word_length" in rules.failures("incomprehensibilities " * 60)
    ellipsis = "\n".join(["This sentence trails off into silence..."] * 4 + ["A complete sentence ends here."] * 6)
    assert rules.failures("\n".join([ellipsis] * 3)) == ["ellipsis_lines"]  # 12 of 30 lines
    symbols = "# $ % 12 34 56 " * 20 + good
    assert "alphabetic_words" in rules.failures(symbols)


def test_gopher_ellipsis_threshold_is_thirty_percent():
    dots, period = "These words end with an ellipsis mark...", "These words end with a period mark."
    assert gopher_quality_filter("\n".join([dots] * 6 + [period] * 14))  # exactly 30 %
    assert not gopher_quality_filter("\n".join([dots] * 7 + [period] * 13))  # 35 %


def test_gopher_empty_and_binary_text():
    assert not gopher_quality_filter("")
    assert not gopher_quality_filter("\x00\x01\x02" * 100)


def test_gopher_step_counts_each_rule():
    step = GopherFilter()
    out = list(run_steps([Document("short"), Document("The cat sat on the warm mat today. " * 10)], [step]))
    assert len(out) == 1
    assert step_report([step])["gopher"]["fail_word_count"] == 1
