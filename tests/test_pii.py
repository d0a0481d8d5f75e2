"""PII and secrets: each type found and not over-found, the actions, counts, idempotence,
a property test on arbitrary text, and the real text of the standard library."""

from __future__ import annotations

import ast
import dataclasses
import ipaddress
import re
import sysconfig
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import from_mapping
from pipeline.errors import ConfigError
from pipeline.pii import PII_TYPES, PLACEHOLDERS, PiiConfig, Redaction, Redactor

# Redact everything (nothing dropped), so that the output can be checked for leftovers.
REDACT_ALL = Redactor(PiiConfig(**dict.fromkeys(PII_TYPES, "redact")))
# Detect and count only: the checker for "no match of any type is left".
DETECT = Redactor(PiiConfig(**dict.fromkeys(PII_TYPES, "keep")))

PEM_BODY = (
    "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u\n"
    "+qKhbwKfBstIs+bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW/VDL5AaWTg0nLVkjRo9z+40RQz\n"
)
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
AZURE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def found(text: str) -> dict[str, int]:
    """Counts of the types found in ``text`` (kept matches left out)."""
    return {k: v for k, v in DETECT.apply(text).counts.items() if not k.endswith("_kept")}


# (type, text, redacted text) with every action set to "redact".
POSITIVES = [
    ("email", "write to barry@python.org today", "write to <EMAIL> today"),
    ("email", "<Jane.Doe+lists@mail.example.co.uk>", "<<EMAIL>>"),
    ("email", "mailto:joe_99@example.com.", "mailto:<EMAIL>."),
    ("email", "főo@bar.com", "<EMAIL>"),
    ("ip_address", "client 8.8.8.8 connected", "client <IP_ADDRESS> connected"),
    ("ip_address", "from 203.0.114.7:443.", "from <IP_ADDRESS>:443."),
    ("ip_address", "dns 2001:4860:4860::8888 ok", "dns <IP_ADDRESS> ok"),
    ("ip_address", "mapped ::ffff:8.8.4.4 here", "mapped <IP_ADDRESS> here"),
    ("phone", "call +44 20 7946 0958 now", "call <PHONE> now"),
    ("phone", "tel +33 1 23 45 67 89", "tel <PHONE>"),
    ("phone", "ring +1 (555) 234-5678", "ring <PHONE>"),
    ("phone", "Tel: +49 (0)30 1234567", "Tel: <PHONE>"),
    ("phone", "office (555) 123-4567", "office <PHONE>"),
    ("phone", "cell 555-123-4567.", "cell <PHONE>."),
    ("phone", "fax 555.123.4567", "fax <PHONE>"),
    ("phone", "toll free 1-800-555-1234", "toll free <PHONE>"),
    ("payment_card", "visa 4111 1111 1111 1111 exp", "visa <CARD_NUMBER> exp"),
    ("payment_card", "mc 5555-5555-5555-4444", "mc <CARD_NUMBER>"),
    ("payment_card", "card=4012888888881881;", "card=<CARD_NUMBER>;"),
    ("payment_card", "amex 3782 822463 10005", "amex <CARD_NUMBER>"),
    ("payment_card", "jcb 3530111333300000", "jcb <CARD_NUMBER>"),
    ("iban", "IBAN DE89 3704 0044 0532 0130 00.", "IBAN <IBAN>."),
    ("iban", "pay GB82WEST12345698765432 now", "pay <IBAN> now"),
    ("iban", "FR14 2004 1010 0505 0001 3M02 606", "<IBAN>"),
    ("iban", "NO93 8601 1117 947", "<IBAN>"),
    ("iban", "MT84 MALT 0110 0001 2345 MTLC AST0 01S", "<IBAN>"),
    # The regex is greedy; the country's length says where the IBAN ends.
    ("iban", "BE68 5390 0754 7034 2024 invoice", "<IBAN> 2024 invoice"),
    ("private_key", f"k:\n-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}-----END RSA PRIVATE KEY-----\n.", "k:\n<PRIVATE_KEY>\n."),
    ("private_key", f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY}-----END PRIVATE KEY-----", "<PRIVATE_KEY>"),
    ("private_key", f"-----BEGIN OPENSSH PRIVATE KEY-----\n{PEM_BODY}-----END OPENSSH PRIVATE KEY-----", "<PRIVATE_KEY>"),
    ("private_key", f"-----BEGIN ENCRYPTED PRIVATE KEY-----\n{PEM_BODY}", "<PRIVATE_KEY>\n"),  # cut-off paste
    (
        "private_key",
        # Escaped line breaks, as in a JSON file or an env variable.
        '{"key": "-----BEGIN PRIVATE KEY-----\\n' + PEM_BODY.replace("\n", "\\n") + '-----END PRIVATE KEY-----\\n"}',
        '{"key": "<PRIVATE_KEY>\\n"}',
    ),
    (
        "private_key",
        f"-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: GnuPG v2\n\n{PEM_BODY}=AbCd\n-----END PGP PRIVATE KEY BLOCK-----",
        "<PRIVATE_KEY>",
    ),
    ("cloud_key", "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE", "AWS_ACCESS_KEY_ID=<SECRET>"),
    ("cloud_key", "id ASIAY34FZKBOKMUTVV7A x", "id <SECRET> x"),
    (
        "cloud_key",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "aws_secret_access_key = <SECRET>",
    ),
    ("cloud_key", "key=AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe&q=1", "key=<SECRET>&q=1"),
    ("cloud_key", "GITHUB_TOKEN=ghp_abcdefghijklmnopqrstuvwxyz0123456789", "GITHUB_TOKEN=<SECRET>"),
    ("cloud_key", "github_pat_11ABCDEFG0123456789abc_defghijklmnop", "<SECRET>"),
    ("cloud_key", "slack xoxb-123456789012-1234567890123-AbCdEfGhIjKl", "slack <SECRET>"),
    ("cloud_key", f"AccountName=x;AccountKey={AZURE_KEY};End", "AccountName=x;AccountKey=<SECRET>;End"),
    ("api_token", "Authorization: Bearer abcdef0123456789abcdef", "Authorization: Bearer <SECRET>"),
    ("api_token", f"token {JWT} end", "token <SECRET> end"),
    ("api_token", f"Authorization: Bearer {JWT}", "Authorization: Bearer <SECRET>"),
    ("api_token", 'password = "s3cr3tP4ss"', 'password = "<SECRET>"'),
    ("api_token", "API_KEY=abc123def456ghi", "API_KEY=<SECRET>"),
    ("api_token", '{"api_key": "sk12345678abc"}', '{"api_key": "<SECRET>"}'),
    ("api_token", "DB_PASSWORD: Tr0ub4dor&3", "DB_PASSWORD: <SECRET>"),
    ("api_token", "x-api-key: 9f8e7d6c5b4a", "x-api-key: <SECRET>"),
    ("url_password", "postgres://admin:S3cret!@db.example.com/x", "postgres://admin:<PASSWORD>@db.example.com/x"),
    ("url_password", "redis://:pw1234@cache:6379/0", "redis://:<PASSWORD>@cache:6379/0"),
    ("url_password", "ftp://joe:password@proxy.example.com", "ftp://joe:<PASSWORD>@proxy.example.com"),
]

# Text that resembles a type but is not personal data: left alone, nothing counted.
NEGATIVES = [
    "Python 3.11.2 and release 2.0.0.1, OID 1.3.6.1.4.1.311",
    "dotted 1.2.3.4.5 and 300.1.1.1 and 01.02.2023",
    "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "luhn-invalid 4111 1111 1111 1112 and 4111111111111112",
    "no issuer 1234567812345670 (Luhn-valid) and epoch ms 1700000000000",
    "bad check digits DE89 3704 0044 0532 0130 01 and unknown country ZZ12 3456 7890 1234",
    "dates 2023-01-15 and 2023-01-15T10:00:00+01:00 and +2023-01-15",
    "numbers +3.14, +1.000000, x +35236450.6 and 555-1234 and 123-45-6789",
    "isbn 978-3-16-148410-0 and area code 155-123-4567",
    "std::vector<int> x[::2] 12:30:45 00:1a:2b:3c:4d:5e",
    "decorators @property and a @ b and matrix a@b.T and icon@2x.png",
    "ssh://git@github.com/owner/repo.git",
    "password = None",
    "token: str",
    'api_key = os.environ["API_KEY"]',
    "password = getpass.getpass()",
    "token = base64.b64encode(data)",
    "token_v2 = token_v2 + 1",
    'secret = "changeme"',
    'api_key = "YOUR_API_KEY"',
    'password = "<your password>"',
    "Bearer authentication and Bearer ${TOKEN}",
    "-----BEGIN PRIVATE KEY-----\n...\n-----END PRIVATE KEY-----",
    "ftp://user:${PASS}@host and http://u:*****@host",
    "AKIA1234 too short and AIza too",
]


@pytest.mark.parametrize(("kind", "text", "redacted"), POSITIVES)
def test_each_type_is_found_and_redacted(kind: str, text: str, redacted: str) -> None:
    result = REDACT_ALL.apply(text)
    assert result.text == redacted
    assert result.counts.get(kind) == 1
    assert set(result.counts) - {"ip_address_kept"} == {kind}
    assert result.dropped_by is None


@pytest.mark.parametrize("text", NEGATIVES)
def test_lookalikes_are_left_alone(text: str) -> None:
    result = REDACT_ALL.apply(text)
    assert result.text == text
    assert {k: v for k, v in result.counts.items() if k != "ip_address_kept"} == {}


def test_non_public_ips_are_kept_and_counted() -> None:
    text = "lo 127.0.0.1, lan 192.168.1.20 and 10.0.0.1, doc 192.0.2.1, any 0.0.0.0, ::1, fe80::1, 2001:db8::1"
    result = REDACT_ALL.apply(text)
    assert result.text == text
    assert result.counts == {"ip_address_kept": 8}
    mixed = REDACT_ALL.apply("gw 192.168.0.1 via 1.1.1.1 and 2606:4700::1111")
    assert mixed.text == "gw 192.168.0.1 via <IP_ADDRESS> and <IP_ADDRESS>"
    assert mixed.counts == {"ip_address": 2, "ip_address_kept": 1}


DOC = (
    "Contact jane@example.com or +44 20 7946 0958.\n"
    f"-----BEGIN EC PRIVATE KEY-----\n{PEM_BODY}-----END EC PRIVATE KEY-----\n"
    "Server 8.8.8.8, card 4111 1111 1111 1111, home 192.168.1.1.\n"
)


def test_defaults_drop_a_document_holding_a_private_key() -> None:
    result = Redactor(PiiConfig()).apply(DOC)
    assert result == Redaction(text=None, counts={"private_key": 1}, dropped_by="private_key")


def test_redact_counts_every_type() -> None:
    result = REDACT_ALL.apply(DOC)
    assert result.text == ("Contact <EMAIL> or <PHONE>.\n<PRIVATE_KEY>\nServer <IP_ADDRESS>, card <CARD_NUMBER>, home 192.168.1.1.\n")
    assert result.counts == {
        "private_key": 1,
        "email": 1,
        "ip_address": 1,
        "ip_address_kept": 1,
        "payment_card": 1,
        "phone": 1,
    }


def test_keep_counts_without_changing() -> None:
    result = DETECT.apply(DOC)
    assert result.text == DOC
    assert result.dropped_by is None
    assert result.counts == REDACT_ALL.apply(DOC).counts


def test_drop_names_the_first_dropping_type_in_order() -> None:
    cfg = dataclasses.replace(PiiConfig(), private_key="redact", email="drop", phone="drop")
    result = Redactor(cfg).apply(DOC)
    assert result.text is None
    assert result.dropped_by == "email"
    assert result.counts == {"private_key": 1, "email": 1}
    text = "no personal data here, only 127.0.0.1"
    assert Redactor(cfg).apply(text) == Redaction(text=text, counts={"ip_address_kept": 1}, dropped_by=None)


def test_a_kept_ip_does_not_trigger_drop() -> None:
    cfg = PiiConfig(ip_address="drop")
    assert Redactor(cfg).apply("ping 10.1.2.3").text == "ping 10.1.2.3"
    assert Redactor(cfg).apply("ping 9.9.9.9").dropped_by == "ip_address"


def test_disabled_changes_and_counts_nothing() -> None:
    assert Redactor(PiiConfig(enabled=False)).apply(DOC) == Redaction(text=DOC, counts={}, dropped_by=None)


def test_mixed_actions() -> None:
    cfg = PiiConfig(email="keep", phone="redact", private_key="redact")
    result = Redactor(cfg).apply(DOC)
    assert result.text is not None
    assert "jane@example.com" in result.text and "<PHONE>" in result.text
    assert result.counts["email"] == 1


def test_secrets_are_removed_before_the_other_scans_see_them() -> None:
    # The URL's password would otherwise be read as the mailbox "S3cret@db.example.com".
    url = REDACT_ALL.apply("dsn postgres://app:S3cret@db.example.com/x")
    assert url.text == "dsn postgres://app:<PASSWORD>@db.example.com/x"
    assert url.counts == {"url_password": 1}
    # Digits inside a key block are never taken for cards, phones or addresses.
    block = f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY}4111111111111111 8.8.8.8\n-----END PRIVATE KEY-----"
    assert REDACT_ALL.apply(block).counts == {"private_key": 1}


@pytest.mark.parametrize(("kind", "text", "redacted"), POSITIVES)
def test_redacting_twice_changes_and_finds_nothing(kind: str, text: str, redacted: str) -> None:
    again = REDACT_ALL.apply(redacted)
    assert again.text == redacted
    assert found(redacted) == {}


def test_a_redaction_that_uncovers_a_match_is_followed_up() -> None:
    # Glued to a card number the token is not a token (its end is unclear); once the card
    # is a placeholder it is, and the output must hold no match either way.
    text = "Authorization: Bearer abcdef0123456789abcdefcard=4012888888881881;"
    result = REDACT_ALL.apply(text)
    assert result.text == "Authorization: Bearer <SECRET><CARD_NUMBER>;"
    assert result.counts == {"payment_card": 1, "api_token": 1}
    assert found(result.text) == {}


def test_placeholders_match_no_pattern() -> None:
    text = " ".join(f"{p} x{p}y key={p} password = {p} Bearer {p} http://u:{p}@h" for p in PLACEHOLDERS.values())
    assert found(text) == {}


def test_types_placeholders_and_config_agree() -> None:
    assert len(PII_TYPES) == len(set(PII_TYPES)) == 9
    assert set(PLACEHOLDERS) == set(PII_TYPES)
    assert {f.name for f in dataclasses.fields(PiiConfig)} == {"enabled", *PII_TYPES}
    assert PII_TYPES.index("private_key") < PII_TYPES.index("email")
    assert PII_TYPES.index("url_password") < PII_TYPES.index("email")
    assert PII_TYPES.index("iban") < PII_TYPES.index("payment_card")


def test_config_from_a_recipe_table() -> None:
    cfg = from_mapping(PiiConfig, {"email": "keep", "cloud_key": "redact"}, source="r.toml", prefix="pii")
    assert cfg.email == "keep" and cfg.cloud_key == "redact" and cfg.private_key == "drop"
    with pytest.raises(ConfigError, match=r'pii\.phone is "mask"'):
        from_mapping(PiiConfig, {"phone": "mask"}, source="r.toml", prefix="pii")
    with pytest.raises(ConfigError, match=r"unknown key 'pii\.emails'"):
        from_mapping(PiiConfig, {"emails": "keep"}, source="r.toml", prefix="pii")
    with pytest.raises(ValueError, match="iban"):
        PiiConfig(iban="hide")  # type: ignore[arg-type]


FRAGMENTS = st.sampled_from(
    [text for _, text, _ in POSITIVES]
    + NEGATIVES
    + list(PLACEHOLDERS.values())
    + [" ", "\n", ".", ":", "::", "-", "+", "(", ")", "@", "=", "/", "://", '"', "'", "<", ">", "_", "%"]
    + ["0", "1", "4", "8", "9", "25", "555", "4111", "a", "Z", "x", "eyJ", "Bearer ", "password=", "DE89", "AKIA"]
)
TEXT = st.lists(st.one_of(FRAGMENTS, st.text(max_size=4)), max_size=24).map("".join)


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_output_holds_no_match_and_is_a_fixed_point(text: str) -> None:
    result = REDACT_ALL.apply(text)
    assert result.text is not None and result.dropped_by is None
    assert found(result.text) == {}
    assert REDACT_ALL.apply(result.text).text == result.text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.sampled_from(PII_TYPES), st.sampled_from(["redact", "drop", "keep"]))
def test_apply_never_raises(text: str, kind: str, action: str) -> None:
    result = Redactor(PiiConfig(**{kind: action})).apply(text)  # type: ignore[arg-type]
    assert (result.text is None) == (result.dropped_by is not None)
    assert all(v > 0 for v in result.counts.values())


# Files without anything shaped like an address are not parsed (parsing all ~1,800 takes
# tens of seconds and adds no address to check).
MAY_HOLD_ADDRESS = re.compile(rb"\w@[\w-]+\.[A-Za-z]|\d\.\d{1,3}\.\d{1,3}\.\d")


def _stdlib_strings() -> list[str]:
    """The string literals (docstrings included) of the running Python's standard library
    files that hold something shaped like an e-mail or IPv4 address."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        source = path.read_bytes()
        if not MAY_HOLD_ADDRESS.search(source):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes in old test files
                tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue  # the test suite holds deliberately broken files
        texts.extend(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str))
    return texts


# Independent of the module's own regex: a local part, "@", dotted labels, a letters-only TLD.
# Not after "/" or "." (ssh://git@host is a login; ".x@y.org" is not an address).
SIMPLE_EMAIL = re.compile(r"(?<![\w./%+-])\w[\w.+-]*@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b(?!-)")
SIMPLE_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")


def _public_ipv4(text: str) -> bool:
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return addr.is_global and not addr.is_multicast


@pytest.mark.slow
def test_standard_library_text() -> None:
    texts = _stdlib_strings()
    assert len(texts) > 20_000
    emails_in = sum(len(SIMPLE_EMAIL.findall(t)) for t in texts)
    totals: dict[str, int] = {}
    out: list[str] = []
    for text in texts:
        result = REDACT_ALL.apply(text)
        assert result.text is not None
        out.append(result.text)
        for key, value in result.counts.items():
            totals[key] = totals.get(key, 0) + value
    assert emails_in > 500
    assert totals["email"] >= emails_in * 0.95
    left = [m.group(0) for t in out for m in SIMPLE_EMAIL.finditer(t)]
    assert left == []
    assert totals["ip_address"] > 100 and totals["ip_address_kept"] > 100
    joined, original = "\n".join(out), "\n".join(texts)
    assert "<IP_ADDRESS>" in joined
    # Loopback and private addresses stay, every one of them.
    for kept in (r"127\.0\.0\.1", r"192\.168\.\d+\.\d+"):
        before = len(re.findall(rf"(?<![\w.]){kept}(?![\w]|\.\d)", original))
        assert before > 5
        assert len(re.findall(rf"(?<![\w.]){kept}(?![\w]|\.\d)", joined)) == before
    # Public unicast addresses left over are the few in IPv6 tails ("::ffff:1.2.3.4") and
    # version lines ("version 1.2.3.4").
    public_left = [m for m in SIMPLE_IPV4.findall(joined) if _public_ipv4(m)]
    assert len(public_left) < totals["ip_address"] * 0.05
    # Deterministic: the same input gives the same output.
    assert [REDACT_ALL.apply(t).text for t in texts[:5000]] == out[:5000]
