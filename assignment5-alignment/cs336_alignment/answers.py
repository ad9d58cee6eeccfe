"""Normalising and comparing final answers to math problems: our own rules first, `math-verify` second.

The cheap string/number rules settle most cases (and are what the tricky-case tests pin down); math-verify
parses both sides into SymPy for the rest (e.g. "\\frac{\\sqrt{8}}{2}" vs "\\sqrt{2}").
"""

import functools
import re
import threading
import warnings
from fractions import Fraction

_UNIT_WORDS = (
    "units?|cm|mm|km|m|meters?|metres?|centimeters?|kilometers?|inch(?:es)?|in|feet|foot|ft|yards?|miles?|"
    "seconds?|secs?|minutes?|mins?|hours?|hrs?|days?|weeks?|months?|years?|degrees?|dollars?|cents?|"
    "grams?|g|kg|kilograms?|pounds?|lbs?|ounces?|oz|liters?|litres?|ml|gallons?|sq|square|cubic|points?|"
    "percent|mph|cups?|people|students?|apples?|times"
)
_POWER = r"(?:\^\{?[23]\}?)?"  # cm^2, m^{3}
_TRAILING_UNIT = re.compile(rf"(?<=[\d}}])\s+(?:(?:{_UNIT_WORDS})\b\.?\s*)+{_POWER}$")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        rest = text[start + len("\\boxed") :].strip()
        return rest.split("$")[0].strip() or None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1 : i]
    return None


def _unwrap_text(s: str) -> str:
    # \text{ cm} -> " cm", \mbox{...} likewise; keeps the words so unit stripping can see them.
    return re.sub(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}", r" \1", s)


def normalize_answer(answer: str) -> str:
    """A canonical string: no TeX spacing/sizing, delimiters, units, degree/percent signs, thousands commas."""
    s = answer.strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\n", " ").strip()
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    s = re.sub(r"^\\[\(\[]|\\[\)\]]$", "", s).strip()
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle"):
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = _unwrap_text(s)
    s = re.sub(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", "", s, flags=re.IGNORECASE)
    s = re.sub(r"^[a-zA-Z]\s*=\s*(?=\S)", "", s)  # "x = 5" -> "5"
    s = s.strip().rstrip(".").strip()
    s = _TRAILING_UNIT.sub("", s).strip()
    s = re.sub(r"^([-+]?\d[\d,]*(?:\.\d+)?)\s+[A-Za-z][A-Za-z\s]*$", r"\1", s)  # "72 clips" -> "72"
    s = _THOUSANDS.sub("", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"(?<=\d)\.0+$", "", s)  # 5.00 -> 5
    return s.lower() if re.fullmatch(r"[A-Za-z ]+", s) else s


def _as_number(s: str) -> Fraction | None:
    """Plain integers, decimals, a/b and \\frac{a}{b} (optionally negative) as exact fractions."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(-?)(-?\d+)/(-?\d+)", s)
    try:
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
        if re.fullmatch(r"-?(?:\d+\.?\d*|\.\d+)(?:e-?\d+)?", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _math_verify_equal(predicted: str, gold: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:  # a bare GPU image (the demo's) may lack it: our rules decided all they could
        _warn_no_math_verify()
        return False

    # math-verify times out with SIGALRM, which only the main thread may use.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
        pred_parsed = parse(f"${predicted}$", parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # parser/SymPy failures on odd strings mean "not shown equal"
        return False


@functools.cache
def _warn_no_math_verify() -> None:
    warnings.warn("math-verify is not installed; answers our rules cannot match count as wrong", stacklevel=3)


def answers_match(predicted: str | None, gold: str, use_math_verify: bool = True) -> bool:
    """True when the predicted final answer equals the gold one, by normalised text, exact number, or SymPy."""
    if predicted is None or not predicted.strip():
        return False
    p, g = normalize_answer(predicted), normalize_answer(gold)
    if not p:
        return False
    if p == g:
        return True
    pn, gn = _as_number(p), _as_number(g)
    if pn is not None and gn is not None:
        return pn == gn
    return use_math_verify and _math_verify_equal(p, g)
