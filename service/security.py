"""API keys: which are configured, and whether a presented one is among them (in constant time).

Keys come from `DIN_API_KEYS` (comma-separated) and `DIN_API_KEYS_FILE` (one per line; blank lines and
lines starting with `#` are skipped), both at start-up: a keys file that cannot be read, or that holds
no key, stops the service (`ConfigError`; `din serve` exits 2) rather than leave it open. Only SHA-256
digests of the keys are kept; `matches` compares the presented key's digest with every one of them
with `hmac.compare_digest`, without stopping at a match, so neither the time nor the key's length says
which key matched or how close a guess came. No key is ever logged or put in a message.

The HTTP side, the dependency that routers require, is `service.api.deps.api_key_guard`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

from contracts.errors import ConfigError
from service.config import Settings

_KEY = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces: what a Bearer token can carry


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """The configured keys (as digests). Falsy when there are none: the service is then open."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests = tuple(dict.fromkeys(_digest(k) for k in keys))

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self)} keys)"

    def matches(self, presented: str) -> bool:
        """Whether `presented` is one of the keys: compared with every key, in constant time."""
        digest = _digest(presented)
        found = False
        for key in self._digests:
            found |= hmac.compare_digest(digest, key)
        return found


def _checked(key: str, where: str) -> str:
    if not _KEY.match(key):
        raise ConfigError(f"{where}: an API key must be printable ASCII without spaces")
    return key


def load_api_keys(settings: Settings) -> ApiKeys:
    """The keys of `DIN_API_KEYS` and `DIN_API_KEYS_FILE`; none configured = an empty `ApiKeys`."""
    keys: list[str] = []
    if settings.api_keys is not None and settings.api_keys.strip():
        given = [k.strip() for k in settings.api_keys.split(",")]
        keys += [_checked(k, f"DIN_API_KEYS, key {i + 1}") for i, k in enumerate(given) if k]
        if not keys:
            raise ConfigError("DIN_API_KEYS is set but holds no key")
    path = settings.api_keys_file
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = (e.strerror or "unreadable") if isinstance(e, OSError) else "not UTF-8 text"
            raise ConfigError(f"DIN_API_KEYS_FILE {path}: cannot be read ({reason})") from e
        found = 0
        for n, line in enumerate(text.splitlines(), start=1):
            key = line.strip()
            if key and not key.startswith("#"):
                keys.append(_checked(key, f"DIN_API_KEYS_FILE {path}, line {n}"))
                found += 1
        if not found:
            raise ConfigError(f"DIN_API_KEYS_FILE {path}: no API key in it (one per line; # comments)")
    return ApiKeys(keys)


def cors_origins(settings: Settings) -> list[str]:
    """The origins of `DIN_CORS_ORIGINS` (comma-separated); empty = no CORS at all."""
    return [o.strip() for o in (settings.cors_origins or "").split(",") if o.strip()]
