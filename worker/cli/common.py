"""Command-line pieces the worker-side commands share (conventions: protocol/endpoints.py).

Exit codes (README.md, "Exit codes"): 0 success; 1 a job failed or a command
did (the scheduler refused it or did not answer); 2 a usage error (click's
own, and BadInput: a bad address, file or option said in one sentence);
130 interrupted (SIGINT, Ctrl-C); 143 terminated (SIGTERM).
"""
from __future__ import annotations

import contextlib
import functools
import signal
from dataclasses import dataclass

import click

from protocol.endpoints import NO_SCHEDULER, check_endpoint, parse_size, ready_line, scheduler_endpoint

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130   # 128 + SIGINT
EXIT_TERMINATED = 143    # 128 + SIGTERM
# How long a command waits for the scheduler's answer, in all (--timeout).
CLIENT_TIMEOUT_S = 5.0


class BadInput(click.ClickException):
    """A usage error (a bad address, job file or option value) in one sentence: exit 2, no usage banner."""

    exit_code = EXIT_USAGE


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be: the same clean-up, then exit 143."""

    exit_code = EXIT_TERMINATED


def interrupt_exit_code(exc: BaseException) -> int:
    """143 for a SIGTERM (Terminated), 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within: SIGTERM raises Terminated (a KeyboardInterrupt), so one `except KeyboardInterrupt` cleans up both."""
    def handler(signum, frame):
        raise Terminated
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def as_usage_error(fn, *args):
    """fn(*args), with its ValueError turned into a one-sentence usage error (BadInput, exit 2)."""
    try:
        return fn(*args)
    except ValueError as exc:
        raise BadInput(str(exc)) from None


def sizes_option(ctx, param, value):
    """click callback for byte counts (4096, 4KiB, 16MiB), one value or several."""
    try:
        return tuple(parse_size(v) for v in value) if isinstance(value, tuple) else parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def scheduler_address(option: str | None) -> str:
    """--scheduler, PSCLUSTER_SCHEDULER or the DMLC variables; a usage error when none is set."""
    addr = as_usage_error(scheduler_endpoint, option)
    if addr is None:
        raise BadInput(NO_SCHEDULER)
    return addr


def check_address(addr: str, what: str) -> str:
    return as_usage_error(check_endpoint, addr, what)


def announce_ready(**facts) -> None:
    """Print the readiness line scripts and tests wait for."""
    click.echo(ready_line(**facts))


def load_keys(curve_dir: str | None, role: str, key_name: str | None):
    """This process's CurveKeys from --curve-dir (None without), or a one-sentence ClickException."""
    if not curve_dir:
        return None
    from protocol.keys import KeyFileError
    from worker.client import CurveKeys

    try:
        return CurveKeys.load(curve_dir, role, key_name)
    except KeyFileError as exc:
        raise BadInput(str(exc)) from None


def curve_client_options(fn):
    """--curve-dir and --key-name for a process that connects to the cluster (README.md, "Security")."""
    fn = click.option("--key-name", default=None,
                      help="Which of the role's keys in --curve-dir to use (default: the only one).")(fn)
    fn = click.option("--curve-dir", type=click.Path(file_okay=False), default=None, envvar="PSCLUSTER_CURVE_DIR",
                      help="CURVE keys (psctl keys generate); or PSCLUSTER_CURVE_DIR.")(fn)
    return fn


@dataclass(frozen=True)
class Connection:
    """Where the scheduler is and, with CURVE, the keys to reach it with."""

    scheduler: str
    keys: object = None   # worker.client.CurveKeys
    timeout_s: float = CLIENT_TIMEOUT_S

    def client(self, **kwargs):
        """A SchedulerClient that waits `timeout_s` in all for an answer (no retries unless asked).

        Its host is resolved first: one that does not resolve is a usage error at once, not a silence.
        """
        from worker.sched_client import SchedulerClient, SchedulerUnresolvable, resolve_host

        try:
            resolve_host(self.scheduler, timeout_s=self.timeout_s)
        except SchedulerUnresolvable as exc:
            raise BadInput(str(exc)) from None
        keys = self.keys.to(self.keys.scheduler) if self.keys is not None else None
        return SchedulerClient(self.scheduler, keys=keys, **{"timeout_s": self.timeout_s, "retries": 0, **kwargs})


def admin_connection(fn):
    """--scheduler, --timeout, --curve-dir and --key-name, given to the command as `conn` (a Connection with
    admin keys)."""
    @functools.wraps(fn)
    def wrapper(*args, scheduler, timeout, curve_dir, key_name, **kwargs):
        return fn(*args, conn=Connection(scheduler_address(scheduler), load_keys(curve_dir, "admin", key_name),
                                         timeout_s=timeout), **kwargs)

    wrapper = curve_client_options(wrapper)
    wrapper = click.option("--timeout", type=click.FloatRange(0.1, 3600), default=CLIENT_TIMEOUT_S,
                           show_default=True, metavar="SECONDS",
                           help="How long to wait for the scheduler's answer.")(wrapper)
    return click.option("--scheduler", default=None,
                        help="Scheduler address (or PSCLUSTER_SCHEDULER, or DMLC_PS_ROOT_URI/PORT).")(wrapper)
