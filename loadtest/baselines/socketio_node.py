"""Baseline (d): Node socket.io 4 (``socketio_node/server.js``), one room per channel.

The same events as the python-socketio baseline (emit ``subscribe``, answered
``subscribed``; publications as ``pub``), but publications come from a plain Redis
``PUBLISH`` on the channel, as for the other plain baselines. Needs ``node`` and
``npm`` (Debian: ``apt-get install nodejs npm``); the first start installs the pinned
packages of ``package-lock.json`` (``npm ci``) next to the server. This module execs
``node``, so the server's pid is the tool's child.

    python -m loadtest.baselines.socketio_node --port 8006 --redis-url redis://…
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from loadtest.baselines._cli import parse_args

HERE = Path(__file__).resolve().parent / "socketio_node"


def ensure_packages() -> str:
    """The ``node`` binary, with the server's packages installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise SystemExit(
            "the socketio_node baseline needs node and npm: apt-get install nodejs npm"
        )
    if not (HERE / "node_modules" / "socket.io").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=HERE, check=True)
    return node


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv)
    node = ensure_packages()
    sys.stdout.flush()
    os.execv(
        node,
        [
            node,
            str(HERE / "server.js"),
            "--host",
            args.host,
            "--port",
            str(args.port),
            "--redis-url",
            args.redis_url,
        ],
    )


if __name__ == "__main__":
    main()
