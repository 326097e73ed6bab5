"""``python -m toolkit.env_file`` (``make .env``): docker-compose's ``.env`` from ``.env.example``.

Every key of ``.env.example`` is kept in its order; the secrets left empty there get random values
(``SECRETS``: how many random bytes each), ``DOCKER_GID`` the group owning the engine's socket, and
``--set KEY=VALUE`` sets any key. The file is written readable by its owner only, and never over an
existing one. The compose stack's test writes its ``.env`` with the same function.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

EXAMPLE = Path(".env.example")
SECRETS = {  # key: random bytes (written as twice as many hex digits)
    "POSTGRES_PASSWORD": 24,
    "MINIO_ROOT_PASSWORD": 24,
    "AIRFLOW_JWT_SECRET": 32,
    "AIRFLOW_SECRET_KEY": 32,
    "LABEL_STUDIO_PASSWORD": 16,
    "LABEL_STUDIO_API_KEY": 20,
}
DOCKER_SOCKET = Path("/var/run/docker.sock")


def example_settings(example: Path = EXAMPLE) -> dict[str, str]:
    """The keys of ``.env.example`` and their values there (mostly empty), in order."""
    lines = example.read_text(encoding="utf-8").splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#"))


def socket_group(socket: Path = DOCKER_SOCKET) -> str:
    """The group owning the engine's socket (0 where there is none): the scheduler joins it."""
    return str(socket.stat().st_gid) if socket.exists() else "0"


def settings(overrides: dict[str, str] | None = None, example: Path = EXAMPLE) -> dict[str, str]:
    """``.env.example``'s keys with its empty secrets filled at random, then ``overrides``."""
    values = example_settings(example)
    for key, length in SECRETS.items():
        if key in values and not values[key]:
            values[key] = secrets.token_hex(length)
    if "DOCKER_GID" in values and not values["DOCKER_GID"]:
        values["DOCKER_GID"] = socket_group()
    return {**values, **(overrides or {})}


def write(path: Path, values: dict[str, str]) -> None:
    """``KEY=VALUE`` lines, owner-only, failing rather than replacing a file that exists."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.writelines(f"{key}={value}\n" for key, value in values.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.env_file", description=__doc__)
    parser.add_argument("--output", type=Path, default=Path(".env"))
    parser.add_argument("--example", type=Path, default=EXAMPLE)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a value to set")
    args = parser.parse_args(argv)
    if bad := [item for item in args.set if "=" not in item]:
        parser.error(f"--set needs KEY=VALUE, got {bad}")
    try:
        write(args.output, settings(dict(item.split("=", 1) for item in args.set), args.example))
    except FileExistsError:
        print(f"env_file: {args.output} exists; remove it to write new secrets", file=sys.stderr)
        return 2
    print(f"wrote {args.output} with random secrets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
