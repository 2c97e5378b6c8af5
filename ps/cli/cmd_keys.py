"""`psctl keys generate`: CURVE key pairs for --curve-dir (README.md, "Security")."""
from __future__ import annotations

import os
from pathlib import Path

import click

from protocol.keys import NAME_RE, ROLES


@click.group("keys")
def keys() -> None:
    """CURVE keys: every daemon and client started with --curve-dir DIR uses them."""


@keys.command("generate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--role", type=click.Choice(ROLES), required=True,
              help="Who the key is for: admin (submit, cancel...), server, worker, or the scheduler.")
@click.option("--name", default=None, help="The key's name (default: the role). A worker id must start with it.")
@click.option("--force", is_flag=True, help="Replace a key of that name.")
def generate(directory, role, name, force):
    """Write DIRECTORY/ROLE/NAME.key (public) and NAME.key_secret (secret, mode 600)."""
    from ps.transport import create_key_pair

    name = name or role
    if not NAME_RE.fullmatch(name):
        raise click.BadParameter("must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
                                 param_hint="--name")
    folder = Path(directory) / role
    if (folder / f"{name}.key_secret").exists() and not force:
        raise click.ClickException(f"{folder / name}.key_secret exists: pass --force to replace it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        public, secret = create_key_pair(folder, name)
    except OSError as exc:
        raise click.ClickException(f"cannot write keys in {folder}: {exc.strerror}") from None
    click.echo(f"{role} key {name}: {public} (give it to every daemon), {secret} (keep it to this {role})")
