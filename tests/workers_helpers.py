"""Helpers for the worker/fault/compose tests: a tiny study file, worker processes, DB polling."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = """
[study]
name = "{name}"
n_trials = {n_trials}
seed = 0

[data]
n_samples = {n_samples}
folds = 1  # these tests are about workers, not scoring: the validation split alone
seq_len = 4
n_features = 2

[train]
epochs = {epochs}
warmup_epochs = 0.0
early_stopping_patience = 0
threads = 1

[baseline]
lr = 1e-3
batch_size = 32
hidden_dim = 8
n_layers = 1
n_heads = 2
dropout = 0.0

[space]
lr = {{ low = 1e-4, high = 1e-2, log = true }}

[sampler]
type = "random"

[pruner]
type = "none"
"""


def drop_synthetic_keys(text: str) -> str:
    """A study file's text without the keys only the synthetic task reads (a data file is refused with them)."""
    return re.sub(r"(?m)^(n_samples|seq_len|n_features|n_classes|noise)\s*=.*\n", "", text)


def write_study(directory: Path, *, name: str = "tiny", n_trials: int = 4, epochs: int = 1,
                n_samples: int = 30) -> Path:
    """A study whose trials take a fraction of a second."""
    path = directory / f"{name}.toml"
    path.write_text(TINY.format(name=name, n_trials=n_trials, epochs=epochs, n_samples=n_samples))
    return path


# The real CLI, with each epoch checkpoint followed by a pause, so a test can hit a trial mid-way.
SLOW_EPOCHS = (
    "import sys, time\n"
    "import cycle_optuna.objective as o\n"
    "save = o.TrialCheckpoints.save\n"
    "def slow(self, epoch, state):\n"
    "    save(self, epoch, state)\n"
    "    time.sleep({pause})\n"
    "o.TrialCheckpoints.save = slow\n"
    "from cycle_optuna.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CYCLE_OPTUNA_STORAGE"}
    env.update(CYCLE_OPTUNA_HEARTBEAT_SECONDS="1", CYCLE_OPTUNA_GRACE_SECONDS="3", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start_cli(args: list[str], *, pause: float = 0.0, env: dict | None = None, cwd: Path | None = None,
              log: Path | None = None, nohup: bool = False, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """`cycle-optuna ARGS` in a new process (epochs slowed by `pause` seconds); `nohup`: with SIGHUP
    ignored, as `nohup` starts it (else SIGHUP does what it does by default, whatever the test
    runner was started with); `prefix`: the command that runs it (e.g. in a network namespace)."""
    hangup = "SIG_IGN" if nohup else "SIG_DFL"
    code = f"import signal; signal.signal(signal.SIGHUP, signal.{hangup})\n" + SLOW_EPOCHS.format(pause=pause)
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([*prefix, sys.executable, "-c", code, *args], env=env or worker_env(), cwd=cwd,
                            stdout=out, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def trials(url: str, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    """The study's trials, or [] before it exists."""
    storage = optuna.storages.RDBStorage(url) if "://" in url else url
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return []
    finally:
        # closed now, not at the next full garbage collection: a test polling this for a minute
        # would otherwise hold dozens of idle PostgreSQL connections beside its workers'
        if not isinstance(storage, str):
            storage.engine.dispose()


def running_with_checkpoint(ts: list[optuna.trial.FrozenTrial], directory: Path, name: str = "tiny"):
    """The running trial once its first epoch checkpoint is on disk in write_study's artifact
    folder. The checkpoint attr names the file before it is written, so the attr alone may name a
    checkpoint that a kill or a signal keeps from ever existing, and the retry starts over."""
    from cycle_optuna.objective import CHECKPOINT_ATTR

    return next((t for t in ts if t.state == optuna.trial.TrialState.RUNNING and CHECKPOINT_ATTR in t.user_attrs
                 and (directory / f"{name}-artifacts" / t.user_attrs[CHECKPOINT_ATTR]).is_file()), None)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A real disk of `size` at `path` (a tmpfs: root only), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is a small tmpfs, which only root can mount")
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("running as root without permission to mount a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def fill_disk(disk: Path) -> Path:
    """Fill `disk` to the last block; the filler file, to delete to free the space."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


# A TCP proxy in front of the local PostgreSQL server, so a test can take the database away from
# the processes that use the proxy's URL (new connections refused, open ones cut) and bring it back,
# without stopping the server other tests share.
_PROXY = """
import asyncio, sys
port, host, target, listen = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def handle(cr, cw):
    try:
        sr, sw = await asyncio.open_connection(host, target)
    except Exception:
        cw.close()
        return
    await asyncio.gather(pipe(cr, sw), pipe(sr, cw))
async def main():
    server = await asyncio.start_server(handle, listen, port, reuse_address=True)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


class PgProxy:
    """`url`: the database of `pg_url` through a proxy on a free local port; `stop()` takes the
    database away (the proxy process ends: connecting is refused, open connections are cut),
    `start()` brings it back on the same port."""

    def __init__(self, pg_url: str, listen: str = "127.0.0.1"):
        import socket

        from sqlalchemy.engine import make_url

        parsed = make_url(pg_url)
        self.host, self.target, self.listen = parsed.host, parsed.port or 5432, listen
        with socket.socket() as s:
            s.bind((listen, 0))
            self.port = s.getsockname()[1]
        self.url = parsed.set(host=listen, port=self.port).render_as_string(hide_password=False)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen([sys.executable, "-c", _PROXY, str(self.port), self.host, str(self.target), self.listen],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "listening", "the proxy did not start"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            self.proc = None


@contextlib.contextmanager
def pg_proxy(pg_url: str):
    """A started PgProxy in front of `pg_url`'s database, stopped afterwards."""
    proxy = PgProxy(pg_url)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


class NetworkLink:
    """A network link a test can cut without a word, as a host that goes down or a network cable
    pulled does: no reset, no refusal, every packet dropped. A network namespace joined to this one
    by a virtual ethernet pair; processes started with `prefix` live behind it and reach `url`, a
    PgProxy on this side of the link (to the local server of `pg_url`; None: no proxy, `outer_ip` is
    this side's address). `cut()` takes this side's end down, `mend()` brings it back. Needs root
    and `ip` (iproute2); skips the test otherwise."""

    def __init__(self, pg_url: str | None):
        if os.geteuid() != 0 or shutil.which("ip") is None:
            pytest.skip("cutting a network link needs root and iproute2's `ip` (network namespaces)")
        tag = f"{os.getpid() % 100_000}"
        self.ns, self.outer, self.inner = f"co-net-{tag}", f"co{tag}a", f"co{tag}b"
        # a /30 of its own: another test's link (another pytest worker) may be up at the same time
        shown = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=30).stdout
        used = {int(m) for m in re.findall(r"inet 10\.231\.(\d+)\.", shown)}
        octet = next(16 + (os.getpid() + k) % 200 for k in range(200) if 16 + (os.getpid() + k) % 200 not in used)
        self.outer_ip, self.inner_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"
        self.prefix = ("ip", "netns", "exec", self.ns)
        self.pg_url = pg_url
        self.proxy: PgProxy | None = None

    def _ip(self, *args: str, inside: bool = False) -> None:
        cmd = [*self.prefix, "ip", *args] if inside else ["ip", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise OSError(f"{' '.join(cmd)}: {done.stderr.strip()}")

    def __enter__(self) -> "NetworkLink":
        try:
            self._ip("netns", "add", self.ns)
        except OSError as e:
            pytest.skip(f"no network namespace here ({e})")
        try:
            try:
                self._ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
            except OSError as e:
                pytest.skip(f"no virtual ethernet pair here ({e})")
            self._ip("link", "set", self.inner, "netns", self.ns)
            self._ip("addr", "add", f"{self.outer_ip}/30", "dev", self.outer)
            self._ip("link", "set", self.outer, "up")
            self._ip("addr", "add", f"{self.inner_ip}/30", "dev", self.inner, inside=True)
            self._ip("link", "set", self.inner, "up", inside=True)
            self._ip("link", "set", "lo", "up", inside=True)
            if self.pg_url is not None:
                self.proxy = PgProxy(self.pg_url, listen=self.outer_ip)
                self.proxy.start()
                self.url = self.proxy.url
        except BaseException:
            self.__exit__()
            raise
        return self

    def cut(self) -> None:
        self._ip("link", "set", self.outer, "down")

    def mend(self) -> None:
        self._ip("link", "set", self.outer, "up")

    def __exit__(self, *exc) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)


class ThrowawayPostgres:
    """A PostgreSQL server of its own for one test, listening on `listen` (e.g. a NetworkLink's
    `outer_ip`, so that the server's own sockets cross the link) and on a Unix socket. `url`: its
    `postgres` database over TCP; `socket_url`: the same over the socket, which no link cut reaches.
    Needs root (initdb runs as the `postgres` user) and the server's binaries; skips the test otherwise."""

    def __init__(self, listen: str):
        def version(path: str) -> tuple[int, ...]:
            return tuple(int(x) for x in re.findall(r"\d+", Path(path).parent.parent.name))

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)  # the newest last
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            bins = []
        if os.geteuid() != 0 or not bins or shutil.which("runuser") is None:
            pytest.skip("a throwaway PostgreSQL server needs root, runuser, the postgres user and initdb")
        self.bin = Path(bins[-1]).parent
        # its own folder under /tmp: a test's tmp_path is closed to other users, and a Unix socket's
        # path must stay short
        self.folder, self.listen = Path(tempfile.mkdtemp(prefix="cycle-pg-")), listen
        with socket.socket() as s:
            s.bind((listen, 0))
            self.port = s.getsockname()[1]
        self.url = f"postgresql+psycopg://postgres@{listen}:{self.port}/postgres"
        self.socket_url = f"postgresql+psycopg://postgres@/postgres?host={self.folder}&port={self.port}"

    def _as_postgres(self, *args: str) -> None:
        done = subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise OSError(f"{' '.join(args)}: {done.stdout.strip()} {done.stderr.strip()}")

    def __enter__(self) -> "ThrowawayPostgres":
        data = self.folder / "data"
        try:
            shutil.chown(self.folder, "postgres")
            self._as_postgres(str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
            with open(data / "pg_hba.conf", "a") as f:
                f.write(f"host all all {self.listen}/24 trust\n")
            options = f"-c listen_addresses={self.listen} -p {self.port} -k {self.folder} -c fsync=off"
            self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.folder / "server.log"), "-w",
                              "-o", options, "start")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"),
                        "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)
