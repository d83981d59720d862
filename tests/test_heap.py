"""The entry points freeze the start-up heap and collect the young generation less often
before serving (gateway.server.heap), and ``create_app`` alone does neither: run in fresh
interpreters, with the server's ``run`` replaced by a report of the collector's state."""

from __future__ import annotations

import gc
import subprocess
import sys

from gateway.server.heap import YOUNG_THRESHOLD
from tests.procs import ROOT

REPORT = (
    "import gc\n"
    "from gateway.server.draining import DrainingServer\n"
    "def run(self, *args, **kwargs):\n"
    "    built = self.config.loaded or not self.config.factory  # an app, or a factory run\n"
    "    print('frozen', gc.get_freeze_count(), 'app', built, 'young', gc.get_threshold()[0])\n"
    "DrainingServer.run = run\n"
)


def python(code: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "GATEWAY_LOG_LEVEL": "warning", "GATEWAY_DEMO": "false"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def frozen(output: str) -> tuple[int, bool, int]:
    """The frozen objects, whether the app was built then, the young generation's threshold."""
    words = output.split()
    return (
        int(words[words.index("frozen") + 1]),
        words[words.index("app") + 1] == "True",
        int(words[words.index("young") + 1]),
    )


def test_python_m_gateway_freezes_the_heap_with_its_app_built() -> None:
    output = python(REPORT + "from gateway.__main__ import main\nmain(['--port', '0'])\n")
    count, app, young = frozen(output)
    assert count > 20_000 and app, output  # the imports and the app, not a handful
    assert young == YOUNG_THRESHOLD != gc.get_threshold()[0], output


def test_each_worker_freezes_the_heap_with_its_app_built() -> None:
    output = python(
        REPORT + "import os, socket, tempfile, uvicorn\n"
        "from gateway.server.workers import APP_FACTORY, _worker_main\n"
        "config = uvicorn.Config(APP_FACTORY, factory=True, log_config=None)\n"
        "with tempfile.TemporaryDirectory() as metrics:\n"
        "    _worker_main(config, socket.socket(), os.getppid(), metrics)\n"
    )
    count, app, young = frozen(output)
    assert count > 20_000 and app, output
    assert young == YOUNG_THRESHOLD, output


def test_create_app_leaves_the_collector_alone() -> None:
    output = python(
        "import gc\nfrom gateway.app import create_app\nfrom gateway.settings import Settings\n"
        "create_app(Settings(jwt_secret='x' * 32, demo=False))\n"
        "print('frozen', gc.get_freeze_count(), 'app', True, 'young', gc.get_threshold()[0])\n"
    )
    assert frozen(output) == (0, True, gc.get_threshold()[0])
