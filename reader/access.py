"""Who may associate with the node: an allow-list of calling AE titles, each optionally bound to
source networks.

The decision is a pure function of (policy, calling AE title, peer address); ``reader.scp`` applies
it when the A-ASSOCIATE-RQ arrives and answers a refusal with A-ASSOCIATE-RJ, result
rejected-permanent, source DICOM UL service-user, reason "calling-AE-title-not-recognized"
(PS3.8 9.3.4, Table 9-21) -- also when the title is known but the address is not, so a
scanner learns nothing about which titles exist.

An empty allow-list admits everyone (the node's behaviour without a ``[security]`` table).
AE titles compare exactly, after removing padding spaces (PS3.5 6.2, VR AE). Addresses are IP
addresses; an IPv4-mapped IPv6 address (``::ffff:10.1.2.3``, seen on a dual-stack listener)
matches IPv4 networks.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["AccessDecision", "AccessPolicy", "AllowedCaller", "Network", "Verdict", "is_loopback",
           "parse_network"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """``"10.0.0.0/8"``, ``"fd00::/8"`` or a single address (``"10.1.2.3"`` = ``/32``).

    Raise ValueError for anything else, host bits set after the prefix included
    (``"10.1.2.3/8"`` is a typing error more often than an intent).
    """
    return ipaddress.ip_network(text.strip(), strict=True)


class Verdict(enum.Enum):
    """Why an association is admitted or refused; the value is the ``reason`` logged."""

    OPEN = "no_allow_list"
    ALLOWED = "allowed"
    UNKNOWN_CALLING_AE = "calling_ae_not_allowed"
    ADDRESS_NOT_ALLOWED = "address_not_allowed"
    UNREADABLE_ADDRESS = "address_not_an_ip"

    @property
    def accepted(self) -> bool:
        """True for the verdicts that admit the association."""
        return self in (Verdict.OPEN, Verdict.ALLOWED)


@dataclass(frozen=True)
class AccessDecision:
    """The verdict for one association request, with what it was decided on (no patient data)."""

    verdict: Verdict
    calling_ae: str
    address: str

    @property
    def accepted(self) -> bool:
        """True when the association may proceed to presentation-context negotiation."""
        return self.verdict.accepted


@dataclass(frozen=True)
class AllowedCaller:
    """One allow-list entry: a calling AE title, from any address or only from ``networks``."""

    ae_title: str
    networks: tuple[Network, ...] = ()

    def __post_init__(self) -> None:
        title = self.ae_title.strip(" ")
        if not title or len(title) > 16 or "\\" in title or not title.isprintable() or not title.isascii():
            raise ValueError(f"{self.ae_title!r} is not a valid AE title (1-16 characters, no backslash)")
        object.__setattr__(self, "ae_title", title)

    def admits(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """True when this entry has no networks or one of them contains ``address``."""
        return not self.networks or any(address in net for net in self.networks)


@dataclass(frozen=True)
class AccessPolicy:
    """The allow-list; with no entries every caller is admitted."""

    callers: tuple[AllowedCaller, ...] = ()

    @classmethod
    def allow(cls, entries: Iterable[tuple[str, Iterable[str]]]) -> AccessPolicy:
        """Build from ``(AE title, [network, ...])`` pairs; ValueError on a bad title or network."""
        return cls(tuple(AllowedCaller(ae, tuple(parse_network(n) for n in nets)) for ae, nets in entries))

    @property
    def is_open(self) -> bool:
        """True when there is no allow-list (everyone is admitted)."""
        return not self.callers

    @property
    def ae_titles(self) -> tuple[str, ...]:
        """The allowed calling AE titles, each once, in configuration order."""
        return tuple(dict.fromkeys(c.ae_title for c in self.callers))

    def decide(self, calling_ae: str, address: str) -> AccessDecision:
        """Admit or refuse an association requested by ``calling_ae`` from IP ``address``."""
        title = calling_ae.strip(" ")
        if self.is_open:
            return AccessDecision(Verdict.OPEN, title, address)
        entries = [c for c in self.callers if c.ae_title == title]
        if not entries:
            return AccessDecision(Verdict.UNKNOWN_CALLING_AE, title, address)
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index
        except ValueError:
            return AccessDecision(Verdict.UNREADABLE_ADDRESS, title, address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(c.admits(ip) for c in entries):
            return AccessDecision(Verdict.ALLOWED, title, address)
        return AccessDecision(Verdict.ADDRESS_NOT_ALLOWED, title, address)


def is_loopback(address: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
