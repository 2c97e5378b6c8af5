"""Where a daemon listens and what a server advertises across machines (protocol/endpoints.py, ps/hosts.py).

The rules are pure functions tested with fake look-ups; the look-ups
themselves (an interface's address, the route to the scheduler) are
tested on loopback only. The command lines, across machines, are tested
between two network namespaces in tests/test_netns.py.
"""
from __future__ import annotations

import socket

import pytest

from protocol.endpoints import (
    NO_SCHEDULER,
    advertise_address,
    check_protected,
    host_of,
    is_wildcard,
    metrics_host,
    scheduler_bind,
    server_bind,
    with_port,
)
from ps.hosts import LOOKUPS, AddressError, advertised_endpoint


class FakeLookups:
    """protocol.endpoints.HostLookups that records what was asked."""

    def __init__(self, interfaces=None, route="10.9.0.7", name="node-7"):
        self.interfaces = interfaces or {"eth1": "10.1.0.5"}
        self.route, self.name = route, name
        self.asked: list = []

    def interface_address(self, name):
        self.asked.append(("interface", name))
        if name not in self.interfaces:
            raise ValueError(f"DMLC_INTERFACE={name}: no such interface here")
        return self.interfaces[name]

    def route_to(self, host, port):
        self.asked.append(("route", host, port))
        return self.route

    def hostname(self):
        self.asked.append(("hostname",))
        return self.name


SCHED = "tcp://10.9.0.1:9000"


def advertise(bind, *, env=None, advertise=None, scheduler=SCHED, lookups=None):
    return advertise_address(bind, advertise=advertise, scheduler=scheduler, environ=env or {},
                             lookups=lookups or FakeLookups())


# --- the advertise rules, in order ------------------------------------------------------------------

def test_advertise_option_wins_and_a_bare_host_takes_the_bound_port():
    env = {"DMLC_NODE_HOST": "10.3.3.3", "DMLC_INTERFACE": "eth1"}
    assert advertise("tcp://0.0.0.0:0", advertise="tcp://srv-0:6000", env=env) == "tcp://srv-0:6000"
    assert advertise("tcp://0.0.0.0:6001", advertise="srv-1", env=env) == "tcp://srv-1:6001"
    assert advertise("tcp://0.0.0.0:6001", advertise="fd00::5", env=env) == "tcp://[fd00::5]:6001"
    for bad in ("tcp://nope", "0.0.0.0", "two words"):
        with pytest.raises(ValueError, match="--advertise"):
            advertise("tcp://0.0.0.0:0", advertise=bad)


def test_a_bind_on_one_address_is_advertised_as_it_is():
    lookups = FakeLookups()
    env = {"DMLC_NODE_HOST": "10.3.3.3"}
    assert advertise("tcp://10.1.0.5:6000", env=env, lookups=lookups) == "tcp://10.1.0.5:6000"
    assert advertise("tcp://127.0.0.1:41000", env=env, lookups=lookups) == "tcp://127.0.0.1:41000"
    assert lookups.asked == []


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:0", "tcp://*:0", "tcp://[::]:0"])
def test_a_wildcard_bind_advertises_dmlc_node_host_first(bind):
    lookups = FakeLookups()
    env = {"DMLC_NODE_HOST": "10.3.3.3", "DMLC_INTERFACE": "eth1"}
    assert advertise(bind, env=env, lookups=lookups) == "tcp://10.3.3.3:0"
    assert advertise(bind, env={"DMLC_NODE_HOST": "node-3.example:1234"}, lookups=lookups) == "tcp://node-3.example:0"
    assert lookups.asked == []  # nothing looked up when the launcher said where we are
    with pytest.raises(ValueError, match="DMLC_NODE_HOST"):
        advertise(bind, env={"DMLC_NODE_HOST": "0.0.0.0"})


def test_then_the_address_of_dmlc_interface():
    lookups = FakeLookups()
    assert advertise("tcp://0.0.0.0:0", env={"DMLC_INTERFACE": "eth1"}, lookups=lookups) == "tcp://10.1.0.5:0"
    assert lookups.asked == [("interface", "eth1")]
    with pytest.raises(ValueError, match="eth9"):  # a wrong interface is an error, not a silent fallback
        advertise("tcp://0.0.0.0:0", env={"DMLC_INTERFACE": "eth9"})


def test_then_the_route_to_the_scheduler_then_the_host_name():
    lookups = FakeLookups()
    assert advertise("tcp://0.0.0.0:0", lookups=lookups) == "tcp://10.9.0.7:0"
    assert lookups.asked == [("route", "10.9.0.1", 9000)]
    for route in (None, "0.0.0.0"):
        lookups = FakeLookups(route=route)
        assert advertise("tcp://0.0.0.0:0", lookups=lookups) == "tcp://node-7:0"
        assert lookups.asked[-1] == ("hostname",)
    lookups = FakeLookups()
    assert advertise("tcp://0.0.0.0:0", scheduler=None, lookups=lookups) == "tcp://node-7:0"
    assert lookups.asked == [("hostname",)]


def test_the_real_port_replaces_port_zero():
    assert with_port("tcp://10.3.3.3:0", "tcp://0.0.0.0:41234") == "tcp://10.3.3.3:41234"
    assert with_port("tcp://10.3.3.3:*", "tcp://0.0.0.0:41234") == "tcp://10.3.3.3:41234"
    assert with_port("tcp://10.3.3.3:6000", "tcp://0.0.0.0:41234") == "tcp://10.3.3.3:6000"
    assert with_port("ipc:///tmp/x", "ipc:///tmp/x") == "ipc:///tmp/x"


def test_host_of_reads_the_forms_launchers_write():
    assert host_of("10.0.0.5", "x") == "10.0.0.5"
    assert host_of(" 10.0.0.5:9000 ", "x") == "10.0.0.5"
    assert host_of("tcp://node-1:9000", "x") == "node-1"
    assert host_of("[fd00::1]:9000", "x") == "[fd00::1]"
    assert host_of("fd00::1", "x") == "[fd00::1]"
    assert is_wildcard("tcp://*:5") and is_wildcard("tcp://0.0.0.0:0") and not is_wildcard("tcp://10.0.0.1:0")


# --- where daemons listen, and protected mode ------------------------------------------------------

def test_a_server_listens_everywhere_only_for_a_scheduler_elsewhere():
    assert server_bind(None, None) == ("tcp://127.0.0.1:0", None)
    assert server_bind(None, "tcp://127.0.0.1:9000") == ("tcp://127.0.0.1:0", None)
    assert server_bind(None, "tcp://localhost:9000") == ("tcp://127.0.0.1:0", None)
    bind, why = server_bind(None, SCHED)
    assert bind == "tcp://0.0.0.0:0" and SCHED in why
    assert server_bind("tcp://10.1.0.5:6000", SCHED) == ("tcp://10.1.0.5:6000", None)


def test_the_scheduler_binds_dmlc_ps_root_port():
    assert scheduler_bind(None, {}) == ("tcp://127.0.0.1:0", None)
    assert scheduler_bind("tcp://127.0.0.1:7", {"DMLC_PS_ROOT_PORT": "9000"}) == ("tcp://127.0.0.1:7", None)
    bind, why = scheduler_bind(None, {"DMLC_PS_ROOT_URI": "10.9.0.1", "DMLC_PS_ROOT_PORT": "9000"})
    assert bind == "tcp://0.0.0.0:9000" and "DMLC_PS_ROOT_URI=10.9.0.1" in why
    bind, why = scheduler_bind(None, {"DMLC_PS_ROOT_PORT": "9000"})
    assert bind == "tcp://0.0.0.0:9000" and "DMLC_PS_ROOT_PORT" in why
    for uri in ("127.0.0.1", "127.0.1.1", "localhost"):  # a launch on one machine stays on loopback
        assert scheduler_bind(None, {"DMLC_PS_ROOT_URI": uri, "DMLC_PS_ROOT_PORT": "9000"}) == (
            "tcp://127.0.0.1:9000", None)


def test_metrics_listen_where_the_daemon_does():
    assert metrics_host(None) == "127.0.0.1"
    assert metrics_host("tcp://127.0.0.1:0") == "127.0.0.1"
    assert metrics_host("tcp://0.0.0.0:0") == "0.0.0.0"
    assert metrics_host(SCHED) == "0.0.0.0"


def test_protected_mode_says_what_a_launch_across_machines_needs():
    _bind, why = server_bind(None, SCHED)
    with pytest.raises(ValueError) as exc:
        check_protected("tcp://0.0.0.0:0", "--bind", curve=False, insecure=False, implied_by=why)
    text = str(exc.value)
    assert "across machines" in text and "--curve-dir" in text and "--insecure" in text and SCHED in text
    assert "\n" not in text
    for curve, insecure in ((True, False), (False, True)):
        assert check_protected("tcp://0.0.0.0:0", "--bind", curve=curve, insecure=insecure, implied_by=why)
    assert "DMLC_PS_ROOT_URI" in NO_SCHEDULER


# --- the look-ups on this machine (loopback only) ---------------------------------------------------

def test_interface_address_by_ioctl():
    assert LOOKUPS.interface_address("lo") == "127.0.0.1"
    names = [n for _, n in socket.if_nameindex()]
    with pytest.raises(ValueError, match="no such interface"):
        LOOKUPS.interface_address("nope0")
    with pytest.raises(ValueError, match="not an interface name"):
        LOOKUPS.interface_address("x" * 20)
    assert "lo" in names


def test_route_to_a_loopback_scheduler():
    assert LOOKUPS.route_to("127.0.0.1", 9) == "127.0.0.1"
    assert LOOKUPS.route_to("::1", 9) in ("::1", None)  # None where IPv6 is off


def test_advertised_endpoint_on_this_machine():
    env = {"DMLC_INTERFACE": "lo"}
    assert advertised_endpoint("tcp://0.0.0.0:41234", environ=env) == "tcp://127.0.0.1:41234"
    assert advertised_endpoint("tcp://0.0.0.0:0", environ={}, scheduler="tcp://127.0.0.1:9",
                               bound="tcp://0.0.0.0:41234") == "tcp://127.0.0.1:41234"
    with pytest.raises(AddressError, match="nope0"):
        advertised_endpoint("tcp://0.0.0.0:0", environ={"DMLC_INTERFACE": "nope0"})
