"""Real services on 127.0.0.1 for the deployment tests: a private PostgreSQL cluster, and helpers that
start a process, wait until it answers, and stop it (and its children) whatever happens."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bindir() -> Path | None:
    """Where initdb/pg_ctl live: PATH, else Debian's /usr/lib/postgresql/<major>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


@contextmanager
def postgres_server(databases=("dagster", "mlflow")):
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth, user ``geojepa``); yields its settings.

    As root, the server runs as the ``postgres`` user (initdb refuses root). Stopped and
    removed at the end, even when the test fails.
    """
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed: `apt-get install -y postgresql` (.ci/run does this)")
    root = Path(tempfile.mkdtemp(prefix="geojepa-pg-"))
    data, port = root / "data", free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "geojepa", "--auth=trust", "-E", "UTF8")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
            "-o", f"-p {port} -h 127.0.0.1 -k {root}", "start")
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="geojepa", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in databases:
                cur.execute(f"CREATE DATABASE {db}")
        conn.close()
        yield {"host": "127.0.0.1", "port": port, "user": "geojepa", "password": "", "log": root / "server.log"}
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


class Service:
    """One started process with its log file."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict, cwd: Path | None = None):
        self.name, self.log_path = name, log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def check_alive(self) -> None:
        """Raise, with the log's tail, if the process has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")

    def wait_http(self, url: str, timeout_s: float = 180) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url, timeout=3).read()
                return
            except OSError:
                self.check_alive()
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer {url} in {timeout_s:.0f} s:\n{self.tail()}")

    def wait_until(self, check, what: str, timeout_s: float = 180) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if check():
                return
            self.check_alive()
            time.sleep(0.5)
        raise RuntimeError(f"{self.name}: {what} not reached in {timeout_s:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.log.close()
