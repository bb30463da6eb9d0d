"""The local stack's Redis for ``@worker_pool(backend="redis")``, as ``just up --with redis`` starts it.

Debian's ``redis-server`` as a background process on 127.0.0.1 with a
password (made once, kept in the state folder, mode 0600), read from a
configuration file of mode 0600: the password is on no command line and in
no log. No persistence: a pool's keys live as long as its run. ``down``
stops it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import redis

from metaflow_stack import settings
from metaflow_stack.daemon import Daemon
from metaflow_stack.errors import StackError, ToolMissingError
from metaflow_stack.local_secrets import secret, state_dir

DEFAULT_PORT = 6379
#: Seconds Redis has to answer once started.
START_TIMEOUT_S = 20.0


def stack_url() -> str | None:
    """The URL of the stack's Redis, once ``just up --with redis`` has made its password here (on its port:
    ``METAFLOW_STACK_REDIS_PORT``, as ``up`` reads it); None before."""
    port = settings.port_number("STACK_REDIS_PORT", os.environ.get("METAFLOW_STACK_REDIS_PORT") or str(DEFAULT_PORT))
    local = LocalRedis(port=port)
    if not local.password_file.is_file():
        return None
    return local.url(secret(local.password_file)[0])


class LocalRedis:
    """Starts and stops the local stack's Redis."""

    def __init__(self, home: Path | None = None, port: int = DEFAULT_PORT) -> None:
        self.home = home or state_dir() / "redis"
        self.port = port
        self.daemon = Daemon(self.home, "redis")

    @property
    def password_file(self) -> Path:
        return self.home / "password"

    def url(self, password: str) -> str:
        return f"redis://:{password}@127.0.0.1:{self.port}/0"

    def shell_url(self) -> str:
        """The URL as a shell reads it, the password taken from its file when the line runs."""
        return f"redis://:$(cat {self.password_file})@127.0.0.1:{self.port}/0"

    def answers(self, password: str) -> bool:
        client = redis.Redis.from_url(self.url(password), socket_timeout=2, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def start(self) -> None:
        """Start Redis (or find this folder's running) on 127.0.0.1 with the stack's Redis password: asked
        with it only once it is ours, never whatever else listens on the port."""
        password, _ = secret(self.password_file)
        binary = shutil.which("redis-server")
        if binary is None:
            raise ToolMissingError("redis-server is not installed", fix="apt-get install redis-server")
        config = self.home / "redis.conf"
        text = (
            f"bind 127.0.0.1\nport {self.port}\nrequirepass {password}\nprotected-mode yes\n"
            f'save ""\nappendonly no\ndir {self.home}\ndaemonize no\n'
        )
        if self.daemon.start(
            [binary, str(config)],
            lambda: self.answers(password),
            START_TIMEOUT_S,
            ports=(self.port,),
            port_fix="choose another with --redis-port (METAFLOW_STACK_REDIS_PORT), or stop what listens there",
            stop_fix="stop it first (`metaflow stack down`)",
            config=(config, text),
        ):
            return
        raise StackError(
            f"Redis did not answer on 127.0.0.1:{self.port}",
            fix=f"see {self.home / 'redis.log'}; is port {self.port} taken? set METAFLOW_STACK_REDIS_PORT",
        )

    def stop(self) -> bool:
        """Stop what ``start`` started; whether something was running."""
        return self.daemon.stop()
