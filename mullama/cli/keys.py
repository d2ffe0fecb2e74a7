"""``mullama keys create|list|revoke``: the keys file, edited directly (no daemon needed; it rereads the file)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mullama.cli.format import format_table
from mullama.ops.keys import SCOPES, create_key, keys_path, read_keys, revoke_key


def add_keys_verb(verb: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``keys`` and its actions with the ``verb`` helper of :func:`mullama.cli.verbs.build_parser`."""
    keys = verb("keys", cmd_keys_list, "Manage API keys")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", parser_class=type(keys))
    create = actions.add_parser("create", help="create a key and print it (only this once)")
    create.set_defaults(handler=cmd_keys_create)
    create.add_argument("name", metavar="NAME")
    create.add_argument("--scope", action="append", choices=SCOPES, required=True,
                        help="what the key may do (repeat for several)")
    create.add_argument("--model", action="append", default=[],
                        help="a model the key may use (a name or glob pattern; repeat; default all)")
    create.add_argument("--rpm", type=int, help="requests per minute at most")
    create.add_argument("--tpm", type=int, help="tokens (prompt and generated) per minute at most")
    listing = actions.add_parser("list", help="list the keys (never the keys themselves)")
    listing.set_defaults(handler=cmd_keys_list)
    revoke = actions.add_parser("revoke", help="delete a key; the daemon refuses it from its next request")
    revoke.set_defaults(handler=cmd_keys_revoke)
    revoke.add_argument("name", metavar="NAME")


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Create a key and print it on stdout."""
    key = create_key(keys_path(), args.name, args.scope, models=args.model, rpm=args.rpm, tpm=args.tpm)
    print(key)
    print(f'Created the key "{args.name}". Store it now: it is not shown again.', file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """Print the keys of the file."""
    rows = [[entry.name, ",".join(entry.scopes), ",".join(entry.models) or "all", str(entry.rpm or "-"),
             str(entry.tpm or "-"), f"mk-...{entry.hint}" if entry.hint else "-", entry.created_at or "-"]
            for entry in read_keys(keys_path())]
    sys.stdout.write(format_table(rows, ["NAME", "SCOPES", "MODELS", "RPM", "TPM", "KEY", "CREATED"]))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Delete a key from the file."""
    revoke_key(keys_path(), args.name)
    print(f"revoked '{args.name}'")
    return 0
