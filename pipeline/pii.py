"""PII and secrets: find personal data and credentials in a document, then redact or drop.

Nine types, applied in the order of ``PII_TYPES``. Secrets come first because a PEM block
or a token is base64 that the e-mail, IP and card scans would otherwise pick apart, and a
document dropped for a private key needs no further scanning. ``url_password`` comes
before ``email`` so that ``ftp://user:pw@host`` loses its password rather than being read
as the address ``pw@host``; ``iban`` comes before ``payment_card`` so that an IBAN's digits
are not taken for a card number.

Precision is preferred over recall throughout: a redaction that hits ordinary text (a
version number, a hash, a date) damages training data on every occurrence, while the
patterns kept narrow still catch the forms in which these values are actually written.
So candidates are found by compiled regexes and then checked: IP addresses with
``ipaddress`` (only public ones are personal data), cards with Luhn and their issuer
prefix, IBANs with the ISO 13616 mod-97 check and per-country length, tokens by whether the
value looks random. Each pattern has a cheap pre-check (a substring, or a short regex
shared by several patterns), so a document without an ``@`` never runs the e-mail regex.

Placeholders (``<EMAIL>``, ``<SECRET>``, ...) match no pattern, and the scan is repeated
until it finds nothing new, so redacting redacted text changes nothing and finds nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from pipeline.config import check

Action = Literal["redact", "drop", "keep"]

PII_TYPES: tuple[str, ...] = (
    "private_key",
    "cloud_key",
    "api_token",
    "url_password",
    "email",
    "ip_address",
    "iban",
    "payment_card",
    "phone",
)

PLACEHOLDERS: dict[str, str] = {
    "private_key": "<PRIVATE_KEY>",
    "cloud_key": "<SECRET>",
    "api_token": "<SECRET>",
    "url_password": "<PASSWORD>",
    "email": "<EMAIL>",
    "ip_address": "<IP_ADDRESS>",
    "iban": "<IBAN>",
    "payment_card": "<CARD_NUMBER>",
    "phone": "<PHONE>",
}

# Suffix of the count of matches that were found but are not personal data (private IPs).
KEPT_SUFFIX = "_kept"


@dataclass(kw_only=True)
class PiiConfig:
    # Private text is the reason this appliance exists; turning the scan off is a deliberate act.
    enabled: bool = True
    # An address identifies a person; the surrounding text is still worth training on.
    email: Action = "redact"
    # Public addresses locate people and hosts; private ones are kept (they identify nothing).
    ip_address: Action = "redact"
    # A phone number identifies a person; the text around it is usually ordinary prose.
    phone: Action = "redact"
    # Card numbers are regulated (PCI DSS) and only ever memorised, never useful to learn.
    payment_card: Action = "redact"
    # An account number identifies a person; the invoice or letter around it is still text.
    iban: Action = "redact"
    # A document holding a private key is far more likely a config dump than prose.
    private_key: Action = "drop"
    # Same for cloud credentials: they come in env files and logs, which teach little.
    cloud_key: Action = "drop"
    # Tokens appear in API docs and examples, whose prose is worth keeping.
    api_token: Action = "redact"
    # Only the password is removed, so the URL still reads as a URL.
    url_password: Action = "redact"

    def __post_init__(self) -> None:
        check(isinstance(self.enabled, bool), "enabled must be true or false")
        allowed = get_args(Action)
        for name in PII_TYPES:
            value = getattr(self, name)
            check(value in allowed, f"{name} is {value!r}, which is not one of {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class Redaction:
    # The redacted text, or None when the document is dropped.
    text: str | None
    # Matches per type (only types with > 0), plus "ip_address_kept" for non-public addresses.
    # When a document is dropped, only the types scanned up to the dropping one are counted.
    counts: dict[str, int]
    # The type whose action "drop" removed the document.
    dropped_by: str | None


# A judge looks at one candidate and says what it is: personal data ("hit"), a match that
# is not personal data ("kept", e.g. a private IP), not a match ("no"), or a hit whose span
# is narrower than the regex match (start, end).
Verdict = Literal["hit", "kept", "no"]
Judge = Callable[[re.Match[str]], Verdict | tuple[int, int]]


def _always(m: re.Match[str]) -> Verdict:
    """For patterns whose regex alone is precise enough."""
    return "hit"


@dataclass(frozen=True, slots=True)
class _Pattern:
    # Finds the candidates; or None when ``scan`` finds the spans itself.
    regex: re.Pattern[str] | None
    # One of these substrings must occur for a match to be possible; empty: always scan.
    needles: tuple[str, ...] = ()
    # Whether the needles are looked for in the lower-cased text.
    fold: bool = False
    # A cheaper regex that must be found in the document for a match to be possible; its
    # result is shared by every pattern with the same gate (computed once per document).
    gate: re.Pattern[str] | None = None
    judge: Judge = _always
    # The group that is replaced (0: the whole match; "v": only the value after a key name).
    group: int | str = 0
    # Finds the spans to replace without a regex (when one regex would be slow).
    scan: Callable[[str], list[tuple[int, int]]] | None = None


# Most patterns begin with one character class and check the character before it with a
# lookbehind placed after it: the regex engine then skips ahead to that class in C instead
# of trying a full match at every position (several times faster).

# Gates. Redaction never lengthens a run of digits (placeholders hold none), so a gate
# checked before a redaction still holds after it.
# Every IPv4 address, card and North American phone number contains such a run of 7+.
_NUMBER_RUN = re.compile(r"[0-9][0-9 .()-]{5,}[0-9]")
# Every IPv6 address with two groups has a group between colons (":db8:") or one after
# "::"; the reST "Example::" does not. Begins with a literal, which the engine finds fast.
_IPV6_GATE = re.compile(r":(?:[0-9A-Fa-f]{1,4}:|:[0-9A-Fa-f])")
# An IBAN's country code and check digits, found from the digits (rarer than capitals).
_IBAN_GATE = re.compile(r"[0-9](?<=[A-Z]{2}[0-9])[0-9]")


# --- private keys -----------------------------------------------------------------------

_PEM_BEGIN = re.compile(r"-----BEGIN (?P<kind>(?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?)-----")
# Base64 lines and armor headers right after the BEGIN line; line breaks may be real or
# escaped ("\\n" in a JSON string or an env file).
_PEM_BODY = re.compile(r"(?:(?:\s|\\[rn])+(?:[A-Za-z0-9+/=]{16,}|(?:Proc-Type|DEK-Info|Version|Comment|Hash): [^\n\\]*))+")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{16,}")
# How far after the body the END line is looked for (a 4096-bit RSA key is about 3.3 KB).
_PEM_END_WINDOW = 32_768


def _pem_spans(text: str) -> list[tuple[int, int]]:
    """Private key blocks: BEGIN line, base64 body, and the END line when there is one.

    Written as a loop rather than one regex: a lazy ``.*?-----END`` rescans the rest of
    the text for every BEGIN line, which is quadratic on a document of headers.
    """
    spans: list[tuple[int, int]] = []
    pos = 0
    while (begin := _PEM_BEGIN.search(text, pos)) is not None:
        body = _PEM_BODY.match(text, begin.end())
        # A header and "..." in documentation is not a key; a real one has ~48 bytes or more.
        if body is None or sum(map(len, _BASE64_RUN.findall(body.group(0)))) < 64:
            pos = begin.end()
            continue
        end = body.end()
        marker = f"-----END {begin.group('kind')}-----"
        found = text.find(marker, end, end + _PEM_END_WINDOW)
        if found >= 0:
            end = found + len(marker)
        spans.append((begin.start(), end))
        pos = end
    return spans


# --- cloud credentials ------------------------------------------------------------------

_ASSIGN_OP = r"[\"']?\s*(?::=|=>|[:=])\s*"

_CLOUD = (
    _Pattern(re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"), ("AKIA", "ASIA")),
    _Pattern(
        re.compile(r"(?i:aws_?secret_?(?:access_?)?key)" + _ASSIGN_OP + r"[\"']?(?P<v>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"),
        ("secret",),
        fold=True,
        group="v",
    ),
    _Pattern(re.compile(r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])"), ("AIza",)),
    _Pattern(
        re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,244})(?![A-Za-z0-9_])"),
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    ),
    _Pattern(
        re.compile(r"(?<![A-Za-z0-9-])xox[abprs]-(?=[A-Za-z-]*[0-9])[A-Za-z0-9-]{10,250}(?![A-Za-z0-9-])"),
        ("xox",),
    ),
    _Pattern(re.compile(r"AccountKey=(?P<v>[A-Za-z0-9+/]{40,}={0,2})(?![A-Za-z0-9+/=])"), ("AccountKey=",), group="v"),
)


# --- API tokens -------------------------------------------------------------------------

_PLACEHOLDER_VALUE = re.compile(r"^(?:[$%{<\[]|.*(?:xxxx|XXXX|\*\*\*|\.\.\.))")
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_NAME_AND_NUMBER = re.compile(r"[A-Za-z_]+[0-9]{1,2}")


def _looks_random(value: str) -> bool:
    """Letters and digits mixed, and not a template, a mask or a (dotted) variable name."""
    has_digit = any(c.isdigit() for c in value)
    has_alpha = any(c.isalpha() for c in value)
    return has_digit and has_alpha and not _PLACEHOLDER_VALUE.match(value)


def _assignment_judge(m: re.Match[str]) -> Verdict:
    value = m.group("v")
    if not _looks_random(value):
        return "no"
    if m.group("q") is None and (_DOTTED_NAME.fullmatch(value) or _NAME_AND_NUMBER.fullmatch(value)):
        return "no"  # settings.SECRET2, token_v2: code, not a literal
    return "hit"


def _bearer_judge(m: re.Match[str]) -> Verdict:
    value = m.group("v")
    if _looks_random(value):
        return "hit"
    # Long random tokens without a digit still mix cases; prose words and names do not.
    mixed = any(c.isupper() for c in value[1:]) and any(c.islower() for c in value)
    return "hit" if len(value) >= 32 and mixed and not _PLACEHOLDER_VALUE.match(value) else "no"


_API = (
    _Pattern(
        re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*(?![A-Za-z0-9_-])"),
        ("eyJ",),
    ),
    _Pattern(
        re.compile(r"(?<![A-Za-z0-9])(?i:bearer)[ \t]+(?P<v>[A-Za-z0-9._~+/-]{16,}=*)(?![A-Za-z0-9._~+/=-])"),
        ("bearer",),
        fold=True,
        judge=_bearer_judge,
        group="v",
    ),
    _Pattern(
        re.compile(
            # A key name, possibly prefixed (DB_PASSWORD, x-api-key, access_token), then
            # = : := => and a value. Case-insensitive only inside (?i:...), so that the
            # first character class stays a fast skip (see _NUMBER_RUN).
            r"[AaSsTtPp](?<![A-Za-z0-9][AaSsTtPp])"
            r"(?i:(?<=a)pi[_-]?key|(?<=s)ecret(?:[_-]?key)?|(?<=t)oken|(?<=p)assw(?:or)?d|(?<=p)wd)"
            + _ASSIGN_OP
            + r"(?P<q>[\"'])?(?P<v>(?(q)[^\"'\s<>]{8,200}|[A-Za-z0-9_\-+/=.~!@#$%^&*]{8,200}))(?(q)(?P=q)|(?![\w(\[]))"
        ),
        ("pass", "pwd", "secret", "token", "apikey", "api_key", "api-key"),
        fold=True,
        judge=_assignment_judge,
        group="v",
    ),
)


# --- passwords in URLs ------------------------------------------------------------------

_MASK = re.compile(r"^(?:\*+|x+|X+|[$%{].*)$")


def _url_password_judge(m: re.Match[str]) -> Verdict:
    # ${DB_PASS}, %(password)s and ***** are templates and masks, not passwords.
    return "no" if _MASK.match(m.group("v")) else "hit"


_URL_PASSWORD = _Pattern(
    # Begins at "://" (a literal the engine finds fast); only the password is replaced.
    re.compile(r"://(?<=[A-Za-z0-9+.-]://)[^\s:/@?#\[\]\"'<>]*:(?P<v>[^\s/@?#\[\]\"'<>]+)@(?=[\w\[])"),
    ("://",),
    judge=_url_password_judge,
    group="v",
)


# --- e-mail -----------------------------------------------------------------------------

# Retina image names (icon@2x.png) have this shape but no such top-level domains exist.
_NOT_TLDS = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp"})


def _email_judge(m: re.Match[str]) -> Verdict:
    return "no" if m.group("tld").lower() in _NOT_TLDS else "hit"


_EMAIL = _Pattern(
    re.compile(
        # Not after "/": ssh://git@host is a login, not a mailbox.
        r"(?<![\w.%+/-])\w[\w.%+-]{0,63}@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+(?P<tld>[^\W\d_]{2,24})(?![\w-]|\.[^\W_])"
    ),
    ("@",),
    judge=_email_judge,
)


# --- IP addresses -----------------------------------------------------------------------

# Exactly four dotted parts: 3.11.2 and 1.2.3.4.5 are not addresses. Not after "hex:",
# which is the IPv4 tail of an IPv6 address (::ffff:192.0.2.1), matched by _IPV6.
_IPV4 = re.compile(r"[0-9](?<![\w.][0-9])(?<![0-9A-Fa-f]:[0-9])[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![\w]|\.[\w])")
# Hex groups and colons (at least two), optionally ending in a dotted IPv4.
_IPV6 = re.compile(
    r"[0-9A-Fa-f:](?<![\w:.][0-9A-Fa-f:])(?:(?<=:)(?=[0-9A-Fa-f]*:)|(?=[0-9A-Fa-f]*:[0-9A-Fa-f]*:))"
    r"[0-9A-Fa-f:]{1,38}(?:(?<=:)[0-9]{1,3}(?:\.[0-9]{1,3}){3})?(?![\w:]|\.[\w])"
)
_VERSION_CONTEXT = re.compile(r"(?i)(?:\bversions?|\brelease|\bv|\boid|\bpython)\s*[:=]?\s*$")
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def _public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return _public(addr.ipv4_mapped)
        # Python calls much of the unassigned IPv6 space "global"; only 2000::/3 is handed out.
        return addr.is_global and addr in _GLOBAL_UNICAST
    return addr.is_global and not addr.is_multicast


def _ipv4_judge(m: re.Match[str]) -> Verdict:
    start = m.start()
    if _VERSION_CONTEXT.search(m.string, max(0, start - 16), start):
        return "no"
    try:
        # Rejects octets above 255 and leading zeros (01.02.2023 is a date).
        addr = ipaddress.IPv4Address(m.group(0))
    except ValueError:
        return "no"
    return "hit" if _public(addr) else "kept"


def _ipv6_judge(m: re.Match[str]) -> Verdict:
    text = m.group(0)
    # "a[::2]" and "x::y" parse as IPv6, but nobody writes an address that way.
    if text != "::1" and sum(1 for part in text.split(":") if part) < 2:
        return "no"
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError:
        return "no"
    return "hit" if _public(addr) else "kept"


# --- IBAN -------------------------------------------------------------------------------

# ISO 13616 registry lengths: the SEPA countries, GB, and other common ones.
_IBAN_LENGTH: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30,
    "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22,
    "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29,
    "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip

_IBAN = re.compile(r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z][0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")


def _iban_end(candidate: str) -> int | None:
    """Length of the valid IBAN at the start of ``candidate``, or None.

    The regex is greedy, so "BE68 5390 0754 7034 2024" may include a following group of
    four; the country's length says where the IBAN really ends.
    """
    length = _IBAN_LENGTH.get(candidate[:2])
    if length is None:
        return None
    seen = 0
    end = len(candidate)
    for i, c in enumerate(candidate):
        if c != " ":
            seen += 1
            if seen == length:
                end = i + 1
                break
    if seen < length or (end < len(candidate) and candidate[end] != " "):
        return None
    compact = candidate[:end].replace(" ", "")
    rearranged = compact[4:] + compact[:4]
    return end if int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1 else None


def _iban_judge(m: re.Match[str]) -> Verdict | tuple[int, int]:
    end = _iban_end(m.group(0))
    return "no" if end is None else (m.start(), m.start() + end)


# --- payment cards ----------------------------------------------------------------------

_CARD = re.compile(
    r"[0-9](?<![\w.+-][0-9])(?:[0-9]{12,18}"
    r"|[0-9]{3}(?P<s>[ -])[0-9]{4}(?P=s)[0-9]{4}(?P=s)[0-9]{1,4}(?:(?P=s)[0-9]{1,3})?"  # 4-4-4-4(-3)
    r"|[0-9]{3}(?P<t>[ -])[0-9]{6}(?P=t)[0-9]{4,5})"  # Amex 4-6-5, Diners 4-6-4
    r"(?![\w]|[.-][0-9])"
)


def _luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _known_issuer(d: str) -> bool:
    """Issuer (IIN) prefix and length of the major card networks; others are not cards."""
    n, p2, p3, p4 = len(d), int(d[:2]), int(d[:3]), int(d[:4])
    if d[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16  # Mastercard
    if p2 in (34, 37):
        return n == 15  # American Express
    if p4 == 6011 or 644 <= p3 <= 649 or p2 in (62, 65):
        return n >= 16  # Discover, UnionPay
    if 3528 <= p4 <= 3589:
        return n >= 16  # JCB
    if 300 <= p3 <= 305 or p2 in (36, 38, 39):
        return n >= 14  # Diners Club
    return p2 in (50, 56, 57, 58, 63, 67)  # Maestro


def _card_judge(m: re.Match[str]) -> Verdict:
    digits = re.sub(r"[ -]", "", m.group(0))
    return "hit" if _known_issuer(digits) and _luhn(digits) else "no"


_CARD_PATTERN = _Pattern(_CARD, gate=_NUMBER_RUN, judge=_card_judge)


# --- phone numbers ----------------------------------------------------------------------

# International: +CC then groups separated by space, dot or dash, "(0)" and "(20)" allowed.
_PHONE_INTL = re.compile(r"\+(?<![\w+.-]\+)[1-9][0-9]*(?:[ .-]?\([0-9]{1,4}\)|(?:[ .-]|(?<=\)))[0-9]+){0,7}(?![\w+]|[.:/-][0-9])")
# North American: (555) 123-4567, 555-123-4567, 555.123.4567, optionally 1- in front. The
# first character is "(", the "1" of "1-" or the area code's first digit (never 0 or 1).
_PHONE_NANP = re.compile(
    r"[(0-9](?<![\w+./-][(0-9])(?:(?<=1)[ .-][(2-9])?"
    r"(?:(?<=\()[2-9][0-9]{2}\) ?|(?<=[2-9])[0-9]{2}[.-])"
    r"[0-9]{3}[.-][0-9]{4}(?![\w+]|[.:/-][0-9])"
)
# Signed decimals (+3.14, +35236450.6) and dates (+2023-01-15) are numbers, not phones.
_NOT_PHONE = re.compile(r"\+[0-9]+\.[0-9]+$|\+[0-9]{4}[-./ ][0-9]{1,2}[-./ ][0-9]{1,2}$")


def _intl_phone_judge(m: re.Match[str]) -> Verdict:
    number = m.group(0)
    digits = "".join(c for c in number if c in "0123456789")
    if not 7 <= len(digits) <= 15 or _NOT_PHONE.match(number):
        return "no"
    if digits[0] == "1":
        # +1 is the North American plan: ten digits follow, the area code never starts with 0 or 1.
        return "hit" if len(digits) == 11 and digits[1] not in "01" else "no"
    if digits[0] == "7":
        return "hit" if len(digits) == 11 else "no"
    # Every other country code has two or three digits: "+3 14" is arithmetic.
    return "hit" if number[2] in "0123456789" else "no"


_PHONE_PATTERNS = (_Pattern(_PHONE_INTL, ("+",), judge=_intl_phone_judge), _Pattern(_PHONE_NANP, gate=_NUMBER_RUN))


# --- the redactor -----------------------------------------------------------------------


_PATTERNS: dict[str, tuple[_Pattern, ...]] = {
    "private_key": (_Pattern(None, ("-----BEGIN",), scan=_pem_spans),),
    "cloud_key": _CLOUD,
    "api_token": _API,
    "url_password": (_URL_PASSWORD,),
    "email": (_EMAIL,),
    "ip_address": (
        _Pattern(_IPV6, gate=_IPV6_GATE, judge=_ipv6_judge),
        _Pattern(_IPV4, gate=_NUMBER_RUN, judge=_ipv4_judge),
    ),
    "iban": (_Pattern(_IBAN, gate=_IBAN_GATE, judge=_iban_judge),),
    "payment_card": (_CARD_PATTERN,),
    "phone": _PHONE_PATTERNS,
}


def _find(patterns: tuple[_Pattern, ...], text: str, folded: str, gates: dict[re.Pattern[str], bool]) -> tuple[list[tuple[int, int]], int]:
    """Spans to replace (sorted, not overlapping) and the number of kept matches."""
    spans: list[tuple[int, int]] = []
    kept = 0
    for pattern in patterns:
        if pattern.gate is not None:
            open_ = gates.get(pattern.gate)
            if open_ is None:
                open_ = gates[pattern.gate] = pattern.gate.search(text) is not None
            if not open_:
                continue
        if pattern.needles:
            haystack = folded if pattern.fold else text
            for needle in pattern.needles:
                if needle in haystack:
                    break
            else:
                continue
        if pattern.regex is None:
            if pattern.scan is not None:
                spans.extend(pattern.scan(text))
            continue
        judge, group = pattern.judge, pattern.group
        for m in pattern.regex.finditer(text):
            verdict = judge(m)
            if verdict == "hit":
                spans.append(m.span(group))
            elif verdict == "kept":
                kept += 1
            elif verdict != "no":
                spans.append(verdict)
    if len(spans) > 1 and len(patterns) > 1:
        # Two patterns of one type can find the same secret (a JWT after "Bearer").
        spans.sort(key=lambda s: (s[0], -s[1]))
        merged = [spans[0]]
        for start, end in spans[1:]:
            if start >= merged[-1][1]:
                merged.append((start, end))
        spans = merged
    return spans, kept


def _replace(text: str, spans: list[tuple[int, int]], placeholder: str) -> str:
    parts: list[str] = []
    last = 0
    for start, end in spans:
        parts.append(text[last:start])
        parts.append(placeholder)
        last = end
    parts.append(text[last:])
    return "".join(parts)


# Redacting one match changes what its neighbours see: "Bearer abc…xyz=4111…" is no token
# while a card number is glued to it, but is one once the card is "<CARD_NUMBER>". So the
# scan is repeated over the redacted text until nothing new is found; in practice a second
# pass finds nothing, and the bound only guarantees the loop ends.
_MAX_PASSES = 8


class Redactor:
    """Applies a ``PiiConfig`` to documents; holds no state between them."""

    def __init__(self, cfg: PiiConfig) -> None:
        self._enabled = cfg.enabled
        self._steps = [(name, getattr(cfg, name), _PATTERNS[name]) for name in PII_TYPES]

    def apply(self, text: str) -> Redaction:
        """Find every type in ``text``; redact, count, or drop the document as configured.

        The output is a fixed point: applying the same redactor to it changes nothing and
        finds nothing of the redacted types.
        """
        counts: dict[str, int] = {}
        if not self._enabled:
            return Redaction(text=text, counts=counts, dropped_by=None)
        # Needles never contain "<" or ">", so no needle can appear across a placeholder:
        # the folded input stays a valid pre-check after redactions (as do the gates).
        folded = text.lower()
        gates: dict[re.Pattern[str], bool] = {}
        steps = self._steps
        for repeat in range(_MAX_PASSES):
            last_changed = -1
            for i, (name, action, patterns) in enumerate(steps):
                if repeat and action == "keep":
                    continue  # unchanged text: counted in the first pass
                spans, kept = _find(patterns, text, folded, gates)
                if kept and not repeat:
                    counts[name + KEPT_SUFFIX] = kept
                if not spans:
                    continue
                counts[name] = counts.get(name, 0) + len(spans)
                if action == "drop":
                    return Redaction(text=None, counts=counts, dropped_by=name)
                if action == "redact":
                    text = _replace(text, spans, PLACEHOLDERS[name])
                    last_changed = i
            if last_changed < 0:
                break
            # Types after the last one that redacted already saw the final text.
            steps = steps[: last_changed + 1]
        return Redaction(text=text, counts=counts, dropped_by=None)
