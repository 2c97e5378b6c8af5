"""CURVE keys on disk and who they belong to. Pure: files in, names out; no sockets.

`psctl keys generate DIR --role ROLE [--name NAME]` writes a key pair in
ZeroMQ's certificate format (what pyzmq's `zmq.auth.create_certificates`
writes and `zmq.auth.load_certificate` reads):

    DIR/ROLE/NAME.key          the public key: hand it to every daemon
    DIR/ROLE/NAME.key_secret   the secret key: only for the process that is NAME

A daemon started with `--curve-dir DIR` trusts every public key it finds
under DIR/admin, DIR/server, DIR/worker and DIR/scheduler, with the role its
folder names, and speaks with its own secret key. The role a request is
allowed comes from the key that authenticated it (ZeroMQ's ZAP user id,
"ROLE:NAME"), never from a field the sender writes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROLES = ("admin", "server", "worker", "scheduler")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEY_LINE = re.compile(r'^\s*(public|secret)-key\s*=\s*"([0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40})"\s*$')


class KeyFileError(ValueError):
    """A key is missing, unreadable or ambiguous; the message is one sentence naming the file or folder."""


@dataclass(frozen=True)
class Identity:
    """Who a CURVE key belongs to: its role and its name."""

    role: str
    name: str

    @property
    def user_id(self) -> str:
        return f"{self.role}:{self.name}"

    @classmethod
    def parse(cls, user_id: str) -> Identity | None:
        """The identity in a ZAP user id ("worker:w3"), or None for anything else."""
        role, _, name = user_id.partition(":")
        return cls(role, name) if role in ROLES and NAME_RE.fullmatch(name) else None

    def owns_worker_id(self, worker: str) -> bool:
        """A worker id this key may use: its name, or its name and a dash before anything else.

        With one key per worker, no worker can act as another; workers that
        share a key (named "worker") can (README.md, "Security").
        """
        return worker == self.name or worker.startswith(self.name + "-")


def read_cert(path: Path) -> tuple[str, str | None]:
    """(public z85, secret z85 or None) of a certificate file."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read the key {path}: {getattr(exc, 'strerror', None) or exc}") from None
    keys = {}
    for line in text.splitlines():
        m = _KEY_LINE.match(line)
        if m:
            keys[m.group(1)] = m.group(2)
    if "public" not in keys:
        raise KeyFileError(f"{path} is not a ZeroMQ certificate (no public-key line)")
    return keys["public"], keys.get("secret")


class KeyRing:
    """Every public key under a curve dir, by role and name, and this process's own pair."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise KeyFileError(f"--curve-dir {self.dir} is not a folder of keys (make one with psctl keys generate)")
        self.public: dict[Identity, str] = {}
        self.by_key: dict[str, Identity] = {}
        for role in ROLES:
            for path in sorted((self.dir / role).glob("*.key")):
                name = path.stem
                if not NAME_RE.fullmatch(name):
                    continue
                public, _ = read_cert(path)
                ident = Identity(role, name)
                self.public[ident] = public
                self.by_key.setdefault(public, ident)

    def names(self, role: str) -> list[str]:
        return sorted(i.name for i in self.public if i.role == role)

    def own(self, role: str, name: str | None = None) -> tuple[Identity, str, str]:
        """(identity, public, secret) of this process: DIR/ROLE/NAME.key_secret (NAME: the only one there)."""
        if name is None:
            secrets = sorted((self.dir / role).glob("*.key_secret"))
            if len(secrets) != 1:
                raise KeyFileError(f"{self.dir / role} holds {len(secrets)} secret keys: name the one to use "
                                f"(--key-name), or generate one with psctl keys generate {self.dir} --role {role}")
            name = secrets[0].name[:-len(".key_secret")]
        path = self.dir / role / f"{name}.key_secret"
        if not path.exists():
            raise KeyFileError(f"no secret key {path} (psctl keys generate {self.dir} --role {role} --name {name})")
        public, secret = read_cert(path)
        if secret is None:
            raise KeyFileError(f"{path} holds no secret-key line")
        return Identity(role, name), public, secret

    def scheduler_key(self) -> str:
        """The scheduler's public key (there is one scheduler)."""
        names = self.names("scheduler")
        if len(names) != 1:
            raise KeyFileError(f"{self.dir / 'scheduler'} must hold exactly one public key, found {len(names)}")
        return self.public[Identity("scheduler", names[0])]

    def key_of(self, user_id: str) -> str | None:
        """The public key of the identity in a ZAP user id."""
        ident = Identity.parse(user_id)
        return self.public.get(ident) if ident is not None else None


@dataclass(frozen=True)
class ClientKeys:
    """What a connecting socket needs: its own pair, and the public key of the daemon it connects to."""

    public: str
    secret: str
    server: str


@dataclass(frozen=True)
class ServerKeys:
    """What a bound socket needs: its own pair, and who may connect (every key of the ring)."""

    public: str
    secret: str
    ring: KeyRing

    def client(self, server: str) -> ClientKeys:
        """This process's pair used to connect to a daemon whose public key is `server`."""
        return ClientKeys(self.public, self.secret, server)
