"""PostgreSQL store URLs in messages: their secrets masked (no psycopg needed here)."""

from __future__ import annotations

import urllib.parse

#: Query parameters of a libpq URL whose values are secrets.
SECRET_PARAMS = ("password", "sslpassword")


def _secret_param(name: str) -> bool:
    name = name.lower()
    return name in SECRET_PARAMS or any(w in name for w in ("password", "secret", "token"))


def _split(url: str) -> tuple[str, str, str, str]:
    """scheme://, user info (or ""), the rest up to the query, the query: without
    ``urlsplit``, which refuses libpq's host lists (``h1:5432,h2:5432``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", url, ""
    # The user info ends at the last "@": a password may hold "?", "/" or "@" (libpq
    # takes them); an "@" in the query would only make more of the URL masked.
    userinfo, at, rest = rest.rpartition("@")
    rest, _, query = rest.partition("?")
    return scheme + "://", userinfo + at, rest, query


def secrets_of(url: str) -> list[str]:
    """The URL's secrets (its password, wherever it is), as written and decoded."""
    _, userinfo, _, query = _split(url)
    found = []
    if ":" in userinfo:
        found.append(userinfo[:-1].partition(":")[2])
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if _secret_param(urllib.parse.unquote_plus(name)) and value:
            found.append(value)
    both = found + [urllib.parse.unquote_plus(v) for v in found]
    return sorted({v for v in both if v}, key=len, reverse=True)


def redact(url: str) -> str:
    """The URL without its password (in the user info or a ``password=`` parameter) or
    any other secret parameter, for messages and logs. Takes libpq's multi-host URLs."""
    scheme, userinfo, rest, query = _split(url)
    if ":" in userinfo:
        userinfo = userinfo[:-1].partition(":")[0] + ":***@"
    if query:
        parts = []
        for part in query.split("&"):
            name, eq, value = part.partition("=")
            if eq and _secret_param(urllib.parse.unquote_plus(name)):
                value = "***"
            parts.append(name + eq + value)
        rest += "?" + "&".join(parts)
    return scheme + userinfo + rest
