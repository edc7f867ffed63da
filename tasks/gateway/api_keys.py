"""API keys: `TTSPOOL_API_KEYS=tenant=key,tenant2=key2`; each key is its tenant's. Admin
keys (`TTSPOOL_ADMIN_KEYS=name=key,...`) are read the same way; each is an operator's."""

from __future__ import annotations

import hmac
import ipaddress

from ..errors import SettingsError
from ..settings import Settings

MIN_KEY_CHARS = 16


class ApiKeys:
    def __init__(self, raw: str, variable: str = "TTSPOOL_API_KEYS") -> None:
        self._tenants: list[tuple[bytes, str]] = []
        for n, pair in enumerate(p.strip() for p in raw.split(",") if p.strip()):
            tenant, eq, key = pair.partition("=")
            tenant, key = tenant.strip(), key.strip()
            # The pair's position only: the text may be a key.
            if not eq or not tenant or not key:
                raise SettingsError(f"{variable}: entry {n + 1} is not name=key")
            if len(key) < MIN_KEY_CHARS:
                raise SettingsError(f"{variable}: the key of {tenant!r} is shorter than "
                                    f"{MIN_KEY_CHARS} characters")
            self._tenants.append((key.encode(), tenant))
        if len({k for k, _ in self._tenants}) != len(self._tenants):
            raise SettingsError(f"{variable}: the same key is given twice")

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    def shares_a_key_with(self, other: "ApiKeys") -> bool:
        return bool({k for k, _ in self._tenants} & {k for k, _ in other._tenants})

    def tenant_for(self, authorization: str | None) -> str | None:
        """The tenant of an `Authorization: Bearer KEY` header, or None."""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        found = None
        # Every key compared, in constant time each: no timing hints about which matched.
        for key, tenant in self._tenants:
            if hmac.compare_digest(key, given.strip().encode()):
                found = tenant
        return found


def admin_keys(settings: Settings, tenants: ApiKeys) -> ApiKeys:
    keys = ApiKeys(settings.admin_keys, "TTSPOOL_ADMIN_KEYS")
    if keys.shares_a_key_with(tenants):
        raise SettingsError("TTSPOOL_ADMIN_KEYS: a key is a tenant's too (TTSPOOL_API_KEYS)")
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(keys: ApiKeys, host: str) -> None:
    """Without keys the gateway is open to anyone who reaches it: loopback only."""
    if not keys.enabled and not is_loopback(host):
        raise SettingsError(
            f"refusing to listen on {host} without API keys: set TTSPOOL_API_KEYS (tenant=key,...) "
            "or listen on 127.0.0.1"
        )
