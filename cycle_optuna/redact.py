"""Secrets out of text: passwords in URLs (userinfo, query string) and `password=` settings."""

from __future__ import annotations

import re

# a URL runs to the next blank or quote; its password may hold '@', ':' or '/'
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>`]+", re.IGNORECASE)
_SECRET_SETTING = re.compile(r"\b(password|passwd|pwd|sslpassword|secret|token|api_key)=([^&\s'\"]*)", re.IGNORECASE)


def mask(text: str) -> str:
    """`text` with every password in a URL, and every `password=...` setting, replaced by ***."""
    return _SECRET_SETTING.sub(lambda m: f"{m[1]}=***", _URL.sub(lambda m: _mask_url(m[0]), text))


def _mask_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    # the host follows the last '@': everything before it is user and password, even an unencoded '@'
    at = rest.rfind("@")
    if at < 0:
        return url
    user, colon, _ = rest[:at].partition(":")
    return f"{scheme}://{user + ':***' if colon else rest[:at]}{rest[at:]}"
