"""Secrets out of text: passwords in URLs (userinfo, query string) and `password=` settings."""

from __future__ import annotations

import re

# a URL runs to the next blank or quote; its password may hold '@', ':' or '/'
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>`]+", re.IGNORECASE)
_SECRET_KEYS = r"password|passwd|pwd|sslpassword|secret|token|api_key"
# A quoted value runs to its closing quote (a value with a letter or digit in it: `token=", "seed"`
# in JSON is an empty value, not a quoted one), an unclosed one to the next blank; an unquoted value
# runs to the next '&', blank or quote (a ':' before a blank is the message's, "URL: reason").
_SECRET_SETTING = re.compile(
    rf"\b({_SECRET_KEYS})=("
    r"""'[^'\n]*\w[^'\n]*'|"[^"\n]*\w[^"\n]*"|'[^'\s:,;]+(?=\s|$)|"[^"\s:,;]+(?=\s|$)"""
    r"""|[^&\s'"]*?(?=:?(?:[&\s'"]|$)))""",
    re.IGNORECASE)
_SECRET_KEY = re.compile(rf"(?:{_SECRET_KEYS})", re.IGNORECASE)


MIN_REMEMBERED = 4
_KNOWN: set[str] = set()  # passwords of the storage URLs this process was given, however malformed


def remember(url: object) -> None:
    """Note the password of a storage URL, so that :func:`mask` hides it wherever it turns up, also
    where the URL is too malformed for the URL pattern (``postgresql//user:pw@host``, ``user:pw@host``)
    or the password holds a blank, a quote or a line break."""
    if not isinstance(url, str):
        return
    from urllib.parse import unquote, unquote_plus

    def note(*pieces: str) -> None:
        # a password of 1-3 characters would mask those letters in every word: the URL pattern alone hides it
        _KNOWN.update(p for p in pieces if len(p) >= MIN_REMEMBERED)

    query = url.partition("?")[2]
    for pair in query.split("&") if query else ():  # ?password=..., however it is quoted or spaced
        key, eq, value = pair.partition("=")
        if eq and value and _SECRET_KEY.fullmatch(key.strip()):
            note(value, unquote_plus(value), value.strip("'\" "), unquote_plus(value).strip("'\" "))
    if "@" not in url:
        return
    before = url[:url.rfind("@")]  # user and password: everything before the host's '@'
    if "://" in before:
        before = before.split("://", 1)[1]
    secret = before.partition(":")[2]
    if secret:
        # its pieces around an unencoded '@' too: a driver that split the URL at the first '@' echoes the rest as the host
        note(secret, unquote(secret), *secret.split("@"), *unquote(secret).split("@"))


def mask_userinfo(authority: str) -> str:
    """`user:password@host` as `user:***@host` (the host follows the last '@'); unchanged without a password."""
    at = authority.rfind("@")
    user, colon, _ = authority[:at].partition(":") if at >= 0 else ("", "", "")
    return f"{user}:***{authority[at:]}" if colon else authority


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _known(secret: str) -> re.Pattern[str]:
    """A remembered password as it turns up: not inside a longer word (a password "test" is not the
    start of "test_source"), where its own first or last character is a word character."""
    if secret not in _PATTERNS:
        before = r"(?<!\w)" if re.match(r"\w", secret[0]) else ""
        after = r"(?!\w)" if re.match(r"\w", secret[-1]) else ""
        _PATTERNS[secret] = re.compile(before + re.escape(secret) + after)
    return _PATTERNS[secret]


def mask(text: str) -> str:
    """`text` with every password in a URL, and every `password=...` setting, replaced by ***."""
    for secret in sorted(_KNOWN, key=len, reverse=True):
        text = _known(secret).sub("***", text)
    return _SECRET_SETTING.sub(lambda m: f"{m[1]}=***", _URL.sub(lambda m: _mask_url(m[0]), text))


def _mask_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    # the host follows the last '@': everything before it is user and password, even an unencoded '@'
    at = rest.rfind("@")
    if at < 0:  # no user part, but "scheme://user:password" without a host reads as a host and a port
        host, colon, port = re.split(r"[/?#]", rest, maxsplit=1)[0].partition(":")
        if colon and port and not host.startswith("[") and not port.isdigit():
            return f"{scheme}://{host}:***{rest[len(host) + 1 + len(port):]}"
        return url
    user, colon, _ = rest[:at].partition(":")
    return f"{scheme}://{user + ':***' if colon else rest[:at]}{rest[at:]}"
