"""`eplbd keygen DIR [--name NAME]`: write a CURVE key pair for a planner, agent or CLI.

Writes ``DIR/NAME.key`` (public, 0644: copy it into the peer's allow-list directory) and
``DIR/NAME.key_secret`` (0600: stays on this host). Refuses to overwrite existing keys.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="directory to write the key files in")
    parser.add_argument(
        "--name",
        default=None,
        help="base name of the key files (default: this host's name)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from eplbd.ops.exits import EXIT_CONFIG, EXIT_ERROR, EXIT_OK
    from eplbd.wire import generate_keypair

    name = args.name or socket.gethostname().split(".")[0] or "eplbd"
    try:
        public, secret = generate_keypair(args.directory, name)
    except FileExistsError as e:
        print(f"eplbd keygen: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (OSError, ValueError) as e:
        print(f"eplbd keygen: cannot write keys: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps({"schema_version": 1, "public": str(public), "secret": str(secret)}))
    else:
        print(f"public key: {public}  (copy into the peer's allow-list directory)")
        print(f"secret key: {secret}  (keep on this host, mode 0600)")
    return EXIT_OK
