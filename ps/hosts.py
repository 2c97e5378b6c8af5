"""This machine's addresses, for a server that must tell others where it is.

The rules (which address a server advertises: --advertise, DMLC_NODE_HOST,
DMLC_INTERFACE, the route to the scheduler, the host name) are pure and
live in protocol/endpoints.py (`advertise_address`); this module does the
look-ups they need, with the standard library only:

- an interface's IPv4 address: the SIOCGIFADDR ioctl on a UDP socket
  (what `ip -4 addr show dev IF` reads), no extra package;
- the address on the route to the scheduler: a UDP socket connect()ed
  to it, then getsockname(). connect() on a datagram socket only picks the
  route and the source address; no packet is sent.

README.md, "Running a cluster", says how a launch across machines uses them.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections.abc import Mapping

from protocol.endpoints import advertise_address, with_port

SIOCGIFADDR = 0x8915    # <linux/sockios.h>: get an interface's (first) IPv4 address
IFNAMSIZ = 16           # <net/if.h>: interface names are at most 15 bytes and a NUL
IFREQ_BYTES = 40        # sizeof(struct ifreq) on 64-bit Linux
_ADDR_OFFSET = 20       # ifr_name[16], then a sockaddr_in: family (2), port (2), address (4)


class AddressError(RuntimeError):
    """No address to advertise could be found; the message is one sentence."""


class MachineLookups:
    """protocol.endpoints.HostLookups on this machine."""

    def interface_address(self, name: str) -> str:
        raw = name.encode("utf-8", "replace")
        if not raw or len(raw) >= IFNAMSIZ:
            raise ValueError(f"DMLC_INTERFACE={name!r} is not an interface name")
        known = sorted(n for _, n in socket.if_nameindex())
        if name not in known:
            raise ValueError(f"DMLC_INTERFACE={name}: no such interface here (this machine has {', '.join(known)})")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                answer = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack(f"{IFREQ_BYTES}s", raw))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise ValueError(f"DMLC_INTERFACE={name} has no IPv4 address") from None
                raise ValueError(f"cannot read the address of DMLC_INTERFACE={name}: {exc.strerror}") from None
        return socket.inet_ntoa(answer[_ADDR_OFFSET:_ADDR_OFFSET + 4])

    def route_to(self, host: str, port: int) -> str | None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError):
            return None
        for family, kind, proto, _name, address in infos[:4]:
            try:
                with socket.socket(family, kind, proto) as sock:
                    sock.connect(address)  # a datagram socket: picks the route, sends nothing
                    return sock.getsockname()[0]
            except OSError:
                continue
        return None

    def hostname(self) -> str:
        return socket.gethostname()


LOOKUPS = MachineLookups()


def advertised_endpoint(bind: str, *, advertise: str | None = None, scheduler: str | None = None,
                        environ: Mapping[str, str] | None = None, bound: str | None = None) -> str:
    """The address a server gives the scheduler (protocol/endpoints.py `advertise_address`).

    `bind` is what it binds (or bound); with `bound`, the endpoint really
    bound, a port of 0 is replaced by the real one. AddressError (one
    sentence) when --advertise, DMLC_NODE_HOST or DMLC_INTERFACE is unusable.
    """
    try:
        addr = advertise_address(bind, advertise=advertise, scheduler=scheduler,
                                 environ=os.environ if environ is None else environ, lookups=LOOKUPS)
    except ValueError as exc:
        raise AddressError(str(exc)) from None
    return with_port(addr, bound) if bound else addr
