"""Nchan (nginx with the nchan module) as a baseline: two nginx on one Redis.

* The **subscriber** nginx serves ``/sub/<channel>`` as WebSocket and EventSource
  (``nchan_subscriber websocket eventsource``) with ``nchan_redis_pass``: the server under
  test, pinned to the server CPUs, one worker process. Its master only forks and waits,
  so the CPU and memory figures are the worker's (``NginxServer.pid``).
* The **publisher** nginx serves ``POST /pub/<channel>`` (``nchan_publisher``) on the same
  Redis, on the load-generator CPUs. A publication goes publisher -> nginx #2 -> Redis ->
  nginx #1 -> subscribers, as the gateway's goes publisher -> API -> Redis -> worker.

The configuration, pid file and temp paths live in a directory of their own; nginx logs to
stderr (its compiled-in default), which ``ManagedProcess`` keeps in a log file. Needs the
Debian packages ``nginx-light libnginx-mod-nchan``.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
from pathlib import Path

from loadtest.ports import free_port
from loadtest.servers import TargetServer

DEBIAN_PACKAGES = "nginx-light libnginx-mod-nchan"
MODULE_PATHS = (
    "/usr/lib/nginx/modules/ngx_nchan_module.so",
    "/usr/share/nginx/modules/ngx_nchan_module.so",
    "/usr/lib64/nginx/modules/ngx_nchan_module.so",
    "/etc/nginx/modules/ngx_nchan_module.so",
)
# Messages kept per channel in Redis, and for how long: a subscriber that connects while
# its channel's Redis subscription is being set up gets them (first message "oldest").
MESSAGE_BUFFER_LENGTH = 100
MESSAGE_TIMEOUT = "60s"


def worker_connections() -> int:
    """As many as the file-descriptor hard limit allows (each connection is one fd)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1_048_576
    return max(1024, hard - 100)


class NchanMissing(RuntimeError):
    pass


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def find_module() -> str | None:
    return next((p for p in MODULE_PATHS if os.path.exists(p)), None)


def require_nchan() -> tuple[str, str]:
    """(nginx binary, nchan module), or ``NchanMissing`` saying what to install."""
    nginx, module = find_nginx(), find_module()
    if nginx is None or module is None:
        missing = "nginx" if nginx is None else "the nchan module (ngx_nchan_module.so)"
        raise NchanMissing(
            f"the nchan target needs {missing}: install the Debian packages "
            f"{DEBIAN_PACKAGES} (apt-get install {DEBIAN_PACKAGES})"
        )
    return nginx, module


def nginx_config(
    directory: Path, module: str, port: int, redis_host: str, redis_port: int, role: str
) -> str:
    """nginx.conf of the ``sub`` (WebSocket + EventSource) or ``pub`` (HTTP POST) side."""
    paths = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    if role == "sub":
        endpoint = "nchan_subscriber websocket eventsource;"
        prefix = "sub"
    else:
        endpoint = "nchan_publisher http;"
        prefix = "pub"
    connections = worker_connections()
    return f"""load_module {module};
worker_processes 1;
worker_rlimit_nofile {connections + 50};
daemon off;
master_process on;
pid {directory / "nginx.pid"};
error_log stderr warn;
events {{
    worker_connections {connections};
    multi_accept on;
}}
http {{
    access_log off;
{paths}
    keepalive_requests 1000000;
    nchan_message_buffer_length {MESSAGE_BUFFER_LENGTH};
    nchan_message_timeout {MESSAGE_TIMEOUT};
    upstream loadtest_redis {{
        nchan_redis_server redis://{redis_host}:{redis_port};
    }}
    server {{
        listen 127.0.0.1:{port} backlog=65535;
        location = /healthz {{
            return 200 "ok\\n";
        }}
        location ~ ^/{prefix}/(.+)$ {{
            {endpoint}
            nchan_channel_id $1;
            nchan_redis_pass loadtest_redis;
        }}
    }}
}}
"""


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


class NginxServer(TargetServer):
    """One nginx (master + one worker) with a generated configuration; ``pid`` is the
    worker's once it is ready (the process that serves the connections)."""

    def __init__(
        self, name: str, role: str, port: int, *, redis_url: str, cpus: list[int] | None
    ) -> None:
        from urllib.parse import urlsplit

        nginx, module = require_nchan()
        self.dir = Path(tempfile.mkdtemp(prefix=f"loadtest-{name}-"))
        self.dir.chmod(0o755)  # started as root, the worker runs as nginx's default user
        redis = urlsplit(redis_url)
        config = nginx_config(
            self.dir, module, port, redis.hostname or "127.0.0.1", redis.port or 6379, role
        )
        (self.dir / "nginx.conf").write_text(config)
        argv = [nginx, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")]
        super().__init__(name, argv, port, cpus=cpus)
        self.worker_pid: int | None = None

    @property
    def pid(self) -> int:
        if self.worker_pid is not None:
            return self.worker_pid
        return super().pid

    @property
    def master_pid(self) -> int:
        return super().pid

    async def wait_ready(self, timeout: float = 90.0) -> None:
        await super().wait_ready(timeout)
        workers = children_of(self.master_pid)
        if len(workers) != 1:
            raise RuntimeError(f"{self.name}: expected one nginx worker, found {workers}")
        self.worker_pid = workers[0]

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        shutil.rmtree(self.dir, ignore_errors=True)


def nchan_servers(
    port: int,
    *,
    redis_url: str,
    server_cpus: list[int] | None,
    loadgen_cpus: list[int] | None,
) -> tuple[NginxServer, NginxServer]:
    """(the subscriber nginx on ``port`` and the server CPUs, the publisher nginx on a
    free port and the load-generator CPUs); neither started."""
    sub = NginxServer("nchan", "sub", port, redis_url=redis_url, cpus=server_cpus)
    pub = NginxServer("nchan-publisher", "pub", free_port(), redis_url=redis_url, cpus=loadgen_cpus)
    return sub, pub
