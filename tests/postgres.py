"""A real PostgreSQL server for the tests: a throwaway cluster on 127.0.0.1, one fresh database per test.

The server comes from Debian's `postgresql` package (`.ci/run` installs it). It is started once per
test run with initdb + pg_ctl in a temporary directory (as the `postgres` user when the tests run as
root, since PostgreSQL refuses to run as root), requires a password over TCP, and is thrown away at
the end. Nothing is skipped when the binaries are missing: the tests fail and say how to install them.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SUPERUSER = "postgres"
_SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",  # TCP on loopback only
    # A throwaway cluster: durability costs time and buys nothing here.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


def server_binaries() -> Path:
    """The directory of initdb and pg_ctl: Debian's newest /usr/lib/postgresql/N/bin, else the PATH."""
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0
    )
    found = debian[-1] if debian else shutil.which("initdb")
    if not found or not shutil.which("pg_ctl", path=str(Path(found).parent)):
        pytest.fail(
            "The PostgreSQL tests need a PostgreSQL server's programs (initdb, pg_ctl), and none are installed. "
            "Install Debian's postgresql package (apt-get install postgresql), as .ci/run does.",
            pytrace=False,
        )
    return Path(found).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """A PostgreSQL cluster in a temporary directory, listening on 127.0.0.1:`port`."""

    def __init__(self) -> None:
        self.bin = server_binaries()
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(SUPERUSER)
            except KeyError:
                pytest.fail(
                    "Running as root, the PostgreSQL tests need the 'postgres' user that Debian's postgresql package creates.",
                    pytrace=False,
                )
        self.directory = Path(tempfile.mkdtemp(prefix="idefics-bot-postgres-"))
        self._as_user: list[str] = []
        if owner is not None:
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", SUPERUSER, "--"]

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        return f"postgresql://{SUPERUSER}:{password or self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str | Path) -> None:
        result = subprocess.run([*self._as_user, *map(str, command)], check=False, capture_output=True, text=True, timeout=120)
        if result.returncode:
            log = self.directory / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"{Path(command[0]).name} failed ({result.returncode}): {result.stderr.strip()}\n{tail}", pytrace=False)

    def start(self) -> None:
        password_file = self.directory / "password"
        password_file.write_text(self.password)
        if self._as_user:
            shutil.chown(password_file, SUPERUSER)
        self._run(
            self.bin / "initdb", "--pgdata", self.data, "--username", SUPERUSER, "--pwfile", password_file,
            "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync",
        )  # fmt: skip
        options = " ".join(f"-c {name}='{value}'" for name, value in {**_SERVER_SETTINGS, "port": self.port}.items())
        log = self.directory / "server.log"
        self._run(
            self.bin / "pg_ctl", "--pgdata", self.data, "--log", log, "--options", options, "--wait", "--timeout=60", "start"
        )

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(self.bin / "pg_ctl", "--pgdata", self.data, "--mode=immediate", "--wait", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def sql(self, statement: str) -> None:
        """Run one statement as the superuser (psql, so that no event loop is involved)."""
        result = subprocess.run(
            [self.bin / "psql", "--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1", "--command", statement, self.url()],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode:
            raise RuntimeError(f"psql: {statement}: {result.stderr.strip()}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The test run's PostgreSQL server (started on first use)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A URL of a new, empty database of its own for one test."""
    name = f"test_{secrets.token_hex(6)}"
    postgres_server.sql(f'CREATE DATABASE "{name}"')
    yield postgres_server.url(name)
    postgres_server.sql(f'DROP DATABASE "{name}" WITH (FORCE)')
