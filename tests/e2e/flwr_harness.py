"""Hermetic helpers to run a Flower (flwr 1.41) app end to end from pytest.

This module contains no tests. It starts real Flower processes on free ports,
with a private ``FLWR_HOME`` and a private Ray temp dir, drives them with the
real ``flwr run`` CLI, and stops every process it started (by PID) on exit,
even when the test body raises.

Two runtimes are supported:

* :func:`simulation_superlink` -- ``flower-superlink --simulation``. Each
  ``flwr run`` executes as a ``flwr-simulation`` process (ServerApp in-process,
  ClientApps in Ray actors) launched by a ``flower-superexec`` that the
  SuperLink spawns itself.
* :func:`simulation_superlink` with ``ray_address`` -- the same, but every
  run's ``flwr-simulation`` attaches to an existing Ray cluster (e.g. one from
  :func:`ray_cluster`: a ``ray start --head`` plus ``ray start --address``
  workers, each node with its own temp dir) through ``RAY_ADDRESS``.
* :func:`deployment_federation` -- a ``flower-superlink`` plus N
  ``flower-supernode`` processes. The ServerApp runs as ``flwr-serverapp`` (child
  of the SuperLink's SuperExec); each ClientApp runs as ``flwr-clientapp``
  (child of the SuperNode's SuperExec). Insecure by default; with ``tls=`` the
  SuperLink serves TLS and, with ``supernode_keys=``, also authenticates
  SuperNodes (``--enable-supernode-auth``): the public keys are registered with
  ``flwr supernode register`` before the SuperNodes start
  (:func:`start_supernode` starts more, e.g. one with an unregistered key).

How 1.41 is wired (facts this module relies on):

* The SuperLink serves the Control, Fleet and Runtime APIs over ONE HTTP port
  (``--host``/``--port``, default 127.0.0.1:8000); ``/health`` answers 200 when
  it is up. ``--control-api-address``/``--fleet-api-address`` are deprecated.
* The CLI reads SuperLink connections from ``$FLWR_HOME/config.toml``
  (``[superlink.<name>]`` with ``address`` and ``insecure``, or, for TLS,
  ``root-certificates``: the CA's certificate as an ABSOLUTE path). If that file does
  not exist, ``flwr`` creates one whose default connection is ``:local:``, which
  lazily spawns a *detached* SuperLink on 127.0.0.1:39091 that outlives the
  command. We always write ``config.toml`` first and pass the connection name.
* Simulation size/resources are per-run ``--federation-config`` overrides
  (``num-supernodes``, ``client-resources-num-cpus`` (int!),
  ``client-resources-num-gpus``, ``init-args-num-cpus``, ...). The old
  ``options.*`` keys in ``config.toml`` still work but are deprecated.
* With TLS, the SuperLink's own SuperExec connects back to ``--host`` (0.0.0.0 and
  :: become 127.0.0.1 and ::1) with ``--ssl-ca-certfile`` as its root, so the
  server certificate needs the loopback address among its SANs.
* With ``--enable-supernode-auth`` a SuperNode whose key is not registered exits
  at start-up (code 305, "Failed to activate SuperNode"); one with no key at all
  is refused too (registration through the Fleet API is disabled).
* SuperLink/SuperNode launch helper processes by bare name (``flower-superexec``,
  ``flwr-simulation``, ``flwr-serverapp``, ``flwr-clientapp``), so the venv's
  ``bin`` directory must be first on ``PATH``.
* The app is shipped as a FAB and unpacked to ``$FLWR_HOME/apps/<pub>.<name>.
  <version>.<hash8>/``; that dir is put first on ``sys.path`` so the app's
  package is imported from the FAB copy (only ``*.py``/``*.toml``/``*.md``/
  ``*.json``/``*.yaml`` files not excluded by ``.gitignore``). With dependency
  installation disabled, third-party deps come from the current venv.
* ServerApp (and, in simulation, ClientApp) processes inherit the SuperLink's
  cwd; in deployment, ClientApps inherit their SuperNode's cwd. Relative paths
  written by an app therefore land in :attr:`FlwrFederation.work_dir`. Prefer
  passing an absolute output dir through the run config.
* ``flwr run --stream`` returns when the run's log stream ends, with exit code
  0 even if the run failed. :func:`flwr_run` therefore also queries
  ``flwr ls --run-id <id> --format json`` and checks for
  ``finished:completed``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import tomli_w

try:
    from tomllib import load as tomllib_load
except ModuleNotFoundError:  # Python 3.10
    from tomli import load as tomllib_load

#: Ports Flower uses by default; never hand these out.
RESERVED_PORTS = frozenset({8000, 8080, 9091, 9092, 9093, 9094, 39091, 39093})
#: Env var (with a unique value) put into every process we start, so that
#: cleanup can find descendants even after they were re-parented.
HARNESS_TAG_VAR = "FLWR_HARNESS_TAG"
#: Name of the SuperLink connection written to ``$FLWR_HOME/config.toml``.
DEFAULT_CONNECTION = "harness"
#: Status string of a successful run as reported by ``flwr ls``.
RUN_COMPLETED = "finished:completed"

_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")


class FlwrHarnessError(RuntimeError):
    """Raised when a Flower process fails to start or a run does not complete."""


# --------------------------------------------------------------------------- #
# Small utilities
# --------------------------------------------------------------------------- #
def free_port(host: str = "127.0.0.1") -> int:
    """Return a currently free TCP port on ``host`` (never a Flower default)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in RESERVED_PORTS:
            return port


def flwr_bin_dir() -> Path:
    """Return the directory holding the ``flwr``/``flower-*`` console scripts."""
    candidate = Path(sys.executable).parent
    if (candidate / "flower-superlink").exists():
        return candidate
    found = shutil.which("flower-superlink")
    if found is None:
        raise FlwrHarnessError("Cannot find `flower-superlink`; is flwr installed?")
    return Path(found).parent


def write_flwr_config(
    flwr_home: Path,
    address: str,
    connection: str = DEFAULT_CONNECTION,
    *,
    options: Mapping[str, Any] | None = None,
    root_certificates: Path | None = None,
) -> Path:
    """Write ``flwr_home/config.toml`` with a single SuperLink connection.

    Insecure, unless ``root_certificates`` (the CA certificate that signed the
    SuperLink's certificate) is given: then ``root-certificates = "<absolute
    path>"`` replaces ``insecure = true`` and the CLI talks TLS.

    The schema (flwr 1.41) is::

        [superlink]
        default = "harness"

        [superlink.harness]
        address = "127.0.0.1:PORT"   # the SuperLink's --host:--port
        insecure = true
        # optional, deprecated (use `flwr run --federation-config` instead):
        # options.num-supernodes = 2
        # options.backend.client-resources.num-cpus = 1

    No ``local`` (``:local:``) connection is written, so the CLI can never
    spawn its own detached SuperLink on 127.0.0.1:39091.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    conn: dict[str, Any] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    if options:
        conn["options"] = dict(options)
    doc = {"superlink": {"default": connection, connection: conn}}
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return path


def _short_tmp_dir(prefix: str) -> Path:
    # Ray puts AF_UNIX sockets under RAY_TMPDIR; those paths must stay < 108 chars,
    # so do not use pytest's (long) tmp_path here.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None))


def _ray_env(tag: str) -> dict[str, str]:
    """This process's environment, minus any inherited Ray address, plus our tag."""
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", HARNESS_TAG_VAR):
        env.pop(var, None)
    env.update(
        {
            "PATH": f"{flwr_bin_dir()}{os.pathsep}{env.get('PATH', '')}",
            HARNESS_TAG_VAR: tag,
            "PYTHONUNBUFFERED": "1",
            # Ray: no usage stats, no log dedup (full ClientApp logs), quiet.
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DISABLE_USAGE_STATS": "1",
            "RAY_DEDUP_LOGS": "0",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        }
    )
    return env


def _base_env(
    flwr_home: Path, tag: str, ray_tmp: Path | None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    env = _ray_env(tag)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
    )
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------- #
# Process management
# --------------------------------------------------------------------------- #
@dataclass
class ManagedProcess:
    """A process started by this harness (in its own session/process group)."""

    name: str
    args: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """PID (== process group id, since it is started with a new session)."""
        return self.popen.pid

    def log_text(self) -> str:
        """Return the captured stdout+stderr of the process."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


def _start(
    name: str, args: Sequence[str], env: Mapping[str, str], cwd: Path, log_dir: Path
) -> ManagedProcess:
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("ab")
    popen = subprocess.Popen(
        list(args),
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return ManagedProcess(name, list(args), popen, log_path, log_file)


@dataclass(frozen=True)
class _ProcInfo:
    ppid: int
    state: str
    sid: int
    start: int  # start time in clock ticks since boot: (pid, start) identifies a process


def _proc_table() -> dict[int, _ProcInfo]:
    """Return ``{pid: _ProcInfo}`` for all processes (Linux ``/proc``)."""
    table: dict[int, _ProcInfo] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        # comm may contain spaces/parens: split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry)] = _ProcInfo(
            ppid=int(fields[1]), state=fields[0], sid=int(fields[3]), start=int(fields[19])
        )
    return table


def _descendants(roots: Sequence[int], table: Mapping[int, _ProcInfo]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _tagged_pids(tag: str) -> set[int]:
    """PIDs whose environment contains ``FLWR_HARNESS_TAG=<tag>``.

    Not sufficient on its own: processes that rewrite their title with
    ``setproctitle`` (e.g. ``ray::DashboardAgent``) clobber ``/proc/PID/environ``.
    """
    needle = f"{HARNESS_TAG_VAR}={tag}".encode()
    pids: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    pids.add(int(entry))
        except OSError:
            continue
    return pids


class _ProcessTracker:
    """Identify every process belonging to a harness-started tree.

    A process is ours if it (a) carries the harness tag in its environment, (b)
    descends from a started process that has not been reaped yet, (c) was
    identified before (same PID *and* start time, so recycled PIDs never match),
    or (d) lives in a session led by one of our processes (SuperLink, SuperExec,
    SuperNode all call ``setsid``; Ray's processes stay in the SuperExec's
    session even after being re-parented to init).
    """

    def __init__(self, procs: Sequence[ManagedProcess], tag: str) -> None:
        self.procs = procs
        self.tag = tag
        self.known: dict[int, int] = {}  # pid -> start time

    def scan(self) -> set[int]:
        """Return the PIDs of our processes that are still alive (not zombies)."""
        table = _proc_table()
        roots = [p.pid for p in self.procs if p.popen.poll() is None]
        found = set(roots) | _descendants(roots, table) | _tagged_pids(self.tag)
        found |= {
            pid for pid, start in self.known.items() if pid in table and table[pid].start == start
        }
        # Session S (== PID of its leader) is ours if its leader is ours, or if the
        # leader is gone: Linux does not re-use PID S while session S has members.
        sessions = {
            table[pid].sid
            for pid in found
            if pid in table and (table[pid].sid not in table or table[pid].sid in found)
        }
        sessions.discard(os.getsid(0))  # never our own (pytest's) session
        found |= {pid for pid, info in table.items() if info.sid in sessions}
        found.discard(os.getpid())
        for pid in found:
            if pid in table:
                self.known[pid] = table[pid].start
        return {pid for pid in found if pid in table and table[pid].state != "Z"}


def _signal_pids(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_processes(procs: Sequence[ManagedProcess], tag: str, grace: float = 10.0) -> None:
    """Stop ``procs`` (in reverse order) and everything they spawned, by PID.

    Each process group gets SIGTERM (graceful: SuperNodes deregister, SuperLink
    stops its SuperExec) and up to ``grace`` seconds; then every leftover process
    of the tree (Ray raylet/gcs/agents/workers, flwr-simulation, flwr-serverapp,
    flwr-clientapp, ...; see :class:`_ProcessTracker`) gets SIGKILL.
    """
    tracker = _ProcessTracker(procs, tag)
    tracker.scan()  # snapshot the intact tree before anything is re-parented
    for proc in reversed(procs):
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=grace)
        tracker.scan()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and tracker.scan():
        time.sleep(0.2)
    for _ in range(5):
        leftover = tracker.scan()
        if not leftover:
            break
        _signal_pids(leftover, signal.SIGKILL)
        time.sleep(0.5)
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)
        if proc._log_file is not None:
            proc._log_file.close()
    still = tracker.scan()
    if still:
        raise FlwrHarnessError(f"Processes survived cleanup: {sorted(still)}")


def _http_ok(url: str, timeout: float = 0.5, cafile: Path | None = None) -> bool:
    context = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


class _HasLogs(Protocol):
    def logs(self, max_chars: int = ...) -> str: ...


def _wait_until(
    ready: Callable[[], bool], proc: ManagedProcess, timeout: float, fed: _HasLogs
) -> None:
    """Poll ``ready()`` until true; fail fast if ``proc`` dies, or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.popen.poll() is not None:
            raise FlwrHarnessError(
                f"{proc.name} exited with code {proc.popen.returncode}\n{fed.logs()}"
            )
        time.sleep(0.2)
    raise FlwrHarnessError(f"{proc.name} not ready after {timeout:.0f}s\n{fed.logs()}")


# --------------------------------------------------------------------------- #
# Federations
# --------------------------------------------------------------------------- #
@dataclass
class FlwrFederation:
    """A running SuperLink (plus SuperNodes in deployment mode)."""

    mode: str  # "simulation" | "deployment"
    connection: str  # SuperLink connection name in $FLWR_HOME/config.toml
    address: str  # SuperLink HTTP address host:port (Control+Fleet+Runtime API)
    flwr_home: Path
    work_dir: Path  # cwd of SuperLink => cwd of ServerApp (and sim ClientApps)
    log_dir: Path
    env: dict[str, str]
    tag: str
    #: Per-run ``--federation-config`` values (simulation only).
    federation_config: dict[str, Any] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)
    supernode_work_dirs: list[Path] = field(default_factory=list)
    #: TLS files of the SuperLink (None: insecure).
    tls: SuperLinkTls | None = None
    #: Whether the SuperLink runs with ``--enable-supernode-auth``.
    supernode_auth: bool = False

    def logs(self, max_chars: int = 20_000) -> str:
        """All captured process logs (each truncated to its last ``max_chars``)."""
        parts = []
        for proc in self.processes:
            text = proc.log_text()
            if len(text) > max_chars:
                text = "...[truncated]...\n" + text[-max_chars:]
            parts.append(f"===== {proc.name} (pid {proc.pid}) log =====\n{text}")
        return "\n".join(parts)


@contextlib.contextmanager
def _federation_scope(
    flwr_home: Path,
    log_dir: Path | None,
    work_dir: Path | None,
    use_ray: bool,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[tuple[Path, Path, str, dict[str, str]]]:
    flwr_home = Path(flwr_home).resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    log_dir = Path(log_dir or flwr_home / "logs").resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(work_dir or flwr_home / "work").resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    ray_tmp = _short_tmp_dir("flwr-ray-") if use_ray else None
    tag = uuid.uuid4().hex
    try:
        yield log_dir, work_dir, tag, _base_env(flwr_home, tag, ray_tmp, extra_env)
    finally:
        if ray_tmp is not None:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def _start_superlink(
    fed: FlwrFederation, port: int, simulation: bool, startup_timeout: float
) -> None:
    args = [str(flwr_bin_dir() / "flower-superlink")]
    if fed.tls is None:
        args.append("--insecure")
    else:
        args += [
            "--ssl-ca-certfile",
            str(fed.tls.ca_cert),
            "--ssl-certfile",
            str(fed.tls.server_cert),
            "--ssl-keyfile",
            str(fed.tls.server_key),
        ]
    if fed.supernode_auth:
        args.append("--enable-supernode-auth")
    args += ["--host", "127.0.0.1", "--port", str(port)]
    args.append("--disable-runtime-dependency-installation")
    if simulation:
        args.append("--simulation")
    proc = _start("superlink", args, fed.env, fed.work_dir, fed.log_dir)
    fed.processes.append(proc)
    scheme, cafile = ("http", None) if fed.tls is None else ("https", fed.tls.ca_cert)
    health_url = f"{scheme}://{fed.address}/health"
    _wait_until(lambda: _http_ok(health_url, cafile=cafile), proc, startup_timeout, fed)


def _new_federation(
    mode: str,
    connection: str,
    scope: tuple[Path, Path, str, dict[str, str]],
    federation_config: dict[str, Any] | None = None,
    *,
    tls: SuperLinkTls | None = None,
    supernode_auth: bool = False,
) -> tuple[FlwrFederation, int]:
    """A federation on a free SuperLink port, with its ``config.toml`` written."""
    log_dir, work_dir, tag, env = scope
    port = free_port()
    address = f"127.0.0.1:{port}"
    fed = FlwrFederation(
        mode=mode,
        connection=connection,
        address=address,
        flwr_home=Path(env["FLWR_HOME"]),
        work_dir=work_dir,
        log_dir=log_dir,
        env=env,
        tag=tag,
        federation_config=federation_config or {},
        tls=tls,
        supernode_auth=supernode_auth,
    )
    root = tls.ca_cert if tls is not None else None
    write_flwr_config(fed.flwr_home, address, connection, root_certificates=root)
    return fed, port


@contextlib.contextmanager
def simulation_superlink(
    flwr_home: Path,
    num_supernodes: int = 2,
    *,
    client_num_cpus: int = 1,
    client_num_gpus: float = 0.0,
    ray_num_cpus: int | None = None,
    ray_address: str | None = None,
    log_dir: Path | None = None,
    work_dir: Path | None = None,
    connection: str = DEFAULT_CONNECTION,
    startup_timeout: float = 60.0,
) -> Iterator[FlwrFederation]:
    """Start ``flower-superlink --simulation`` on a free port; stop it on exit.

    ``num_supernodes`` and the per-ClientApp resources are not SuperLink flags
    in 1.41; they are sent with every :func:`flwr_run` as
    ``--federation-config`` (see :attr:`FlwrFederation.federation_config`).
    ``client_num_cpus`` must be an int (proto field is int32; the 1.41 default
    is 2 CPUs per ClientApp, i.e. only one ClientApp at a time on 2 cores).
    ``ray_num_cpus`` caps the CPUs Ray sees (``init-args-num-cpus``).

    ``ray_address`` (a GCS ``host:port``, e.g. :attr:`RayCluster.address`)
    attaches every run to that existing Ray cluster instead of a private one:
    it is put into the SuperLink's environment as ``RAY_ADDRESS``, which its
    SuperExec and ``flwr-simulation`` inherit; the Ray backend's bare
    ``ray.init(...)`` then connects to it. It cannot be combined with
    ``ray_num_cpus``: Ray refuses ``num_cpus`` when connecting to a cluster.
    """
    if ray_address is not None and ray_num_cpus is not None:
        raise ValueError("ray_num_cpus (init-args-num-cpus) is refused by an existing cluster")
    with _federation_scope(flwr_home, log_dir, work_dir, use_ray=True) as scope:
        if ray_address is not None:
            scope[3]["RAY_ADDRESS"] = ray_address
        fed_cfg: dict[str, Any] = {
            "num-supernodes": int(num_supernodes),
            "client-resources-num-cpus": int(client_num_cpus),
            "client-resources-num-gpus": float(client_num_gpus),
        }
        if ray_num_cpus is not None:
            fed_cfg["init-args-num-cpus"] = int(ray_num_cpus)
        fed, port = _new_federation("simulation", connection, scope, fed_cfg)
        try:
            _start_superlink(fed, port, simulation=True, startup_timeout=startup_timeout)
            yield fed
        finally:
            stop_processes(fed.processes, fed.tag)


@dataclass(frozen=True)
class SuperLinkTls:
    """The SuperLink's TLS files (as written by ``deploy/make-certs.sh``)."""

    ca_cert: Path  # --ssl-ca-certfile; the root-certificates of SuperNodes and the CLI
    server_cert: Path  # --ssl-certfile
    server_key: Path  # --ssl-keyfile

    @classmethod
    def from_dir(cls, folder: Path) -> SuperLinkTls:
        """``ca.crt``, ``server.pem`` and ``server.key`` of ``folder``."""
        folder = Path(folder).resolve()
        return cls(folder / "ca.crt", folder / "server.pem", folder / "server.key")


def _flwr_cli(
    fed: FlwrFederation, args: Sequence[str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``flwr <args>`` with the federation's env and cwd; stdout+stderr merged."""
    return subprocess.run(
        [str(flwr_bin_dir() / "flwr"), *args],
        env={**fed.env, "COLUMNS": "200"},
        cwd=fed.work_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
        start_new_session=True,
    )


def _json_of(text: str) -> dict[str, Any]:
    return dict(json.loads(text[text.index("{") : text.rindex("}") + 1]))


def register_supernode(fed: FlwrFederation, public_key: Path) -> int:
    """``flwr supernode register <public_key> <connection>``; returns the node id."""
    args = ["supernode", "register", str(public_key), fed.connection, "--format", "json"]
    out = _flwr_cli(fed, args)
    try:
        return int(_json_of(out.stdout)["node-id"])
    except (ValueError, KeyError) as err:
        raise FlwrHarnessError(f"`flwr {' '.join(args)}` failed: {out.stdout}") from err


def list_supernodes(fed: FlwrFederation) -> dict[int, str]:
    """``flwr supernode list <connection> --format json`` as ``{node id: status}``."""
    out = _flwr_cli(fed, ["supernode", "list", fed.connection, "--format", "json"])
    try:
        nodes = _json_of(out.stdout)["nodes"]
        return {int(n["node-id"]): str(n["status"]) for n in nodes}
    except (ValueError, KeyError) as err:
        raise FlwrHarnessError(f"`flwr supernode list` failed: {out.stdout}") from err


def start_supernode(
    fed: FlwrFederation,
    node_config: Mapping[str, Any],
    *,
    name: str | None = None,
    auth_key: Path | None = None,
) -> ManagedProcess:
    """Start one ``flower-supernode`` for ``fed`` (stopped with the federation).

    It gets its own Runtime API port (``--port``) and cwd ``work_dir/<name>``;
    with TLS it trusts the federation's CA (``--root-certificates``); with
    ``auth_key`` it signs its requests with that private key
    (``--auth-supernode-private-key``). Does not wait: see :func:`wait_online`.
    """
    name = name or f"supernode-{len(fed.supernode_work_dirs)}"
    node_dir = fed.work_dir / name
    node_dir.mkdir(parents=True, exist_ok=True)
    fed.supernode_work_dirs.append(node_dir)
    args = [str(flwr_bin_dir() / "flower-supernode")]
    if fed.tls is None:
        args.append("--insecure")
    else:
        args += ["--root-certificates", str(fed.tls.ca_cert)]
    if auth_key is not None:
        args += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    args += ["--superlink", fed.address, "--host", "127.0.0.1", "--port", str(free_port())]
    args += ["--node-config", format_config_args(node_config)]
    proc = _start(name, args, fed.env, node_dir, fed.log_dir)
    fed.processes.append(proc)
    return proc


def wait_online(fed: FlwrFederation, node: ManagedProcess, timeout: float = 60.0) -> None:
    """Wait until ``node`` logs ``SuperNode ID:`` (registered and activated)."""
    _wait_until(lambda: "SuperNode ID:" in node.log_text(), node, timeout, fed)


@contextlib.contextmanager
def deployment_federation(
    flwr_home: Path,
    num_supernodes: int = 2,
    node_configs: Sequence[Mapping[str, Any]] | None = None,
    *,
    tls: SuperLinkTls | None = None,
    supernode_keys: Sequence[Path] | None = None,
    extra_env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    work_dir: Path | None = None,
    connection: str = DEFAULT_CONNECTION,
    startup_timeout: float = 60.0,
) -> Iterator[FlwrFederation]:
    """Start a SuperLink + ``num_supernodes`` SuperNodes (free ports).

    ``node_configs[i]`` becomes SuperNode i's ``--node-config`` (TOML values,
    e.g. ``{"partition-id": 0, "num-partitions": 2}``); by default each node gets
    ``partition-id=i num-partitions=num_supernodes``. Each SuperNode has its own
    Runtime (ClientAppIo) port and its own cwd ``work_dir/supernode-<i>``. The
    context yields once every SuperNode has logged ``SuperNode ID:``, i.e. is
    registered and online at the SuperLink.

    Insecure unless ``tls`` is given. ``supernode_keys`` (one private key per
    SuperNode, its public key next to it as ``<key>.pub``; needs ``tls``) turns
    on ``--enable-supernode-auth``: each public key is registered with ``flwr
    supernode register`` before SuperNode i starts with key i. ``extra_env`` is
    added to the environment of every process (e.g. ``{"FEDLPT_EAGER": "1"}``).
    """
    if node_configs is None:
        node_configs = [
            {"partition-id": i, "num-partitions": num_supernodes} for i in range(num_supernodes)
        ]
    if len(node_configs) != num_supernodes:
        raise ValueError("need exactly one node_config per SuperNode")
    if supernode_keys is not None and (tls is None or len(supernode_keys) != num_supernodes):
        raise ValueError("supernode_keys needs tls and exactly one key per SuperNode")
    with _federation_scope(flwr_home, log_dir, work_dir, False, extra_env) as scope:
        fed, port = _new_federation(
            "deployment", connection, scope, tls=tls, supernode_auth=supernode_keys is not None
        )
        try:
            _start_superlink(fed, port, simulation=False, startup_timeout=startup_timeout)
            keys: Sequence[Path | None] = supernode_keys or [None] * num_supernodes
            for key in keys:
                if key is not None:
                    register_supernode(fed, Path(f"{key}.pub"))
            nodes = [
                start_supernode(fed, node_config, name=f"supernode-{i}", auth_key=key)
                for i, (node_config, key) in enumerate(zip(node_configs, keys, strict=True))
            ]
            for node in nodes:
                # Logged once the node is registered and activated at the SuperLink.
                wait_online(fed, node, startup_timeout)
            yield fed
        finally:
            stop_processes(fed.processes, fed.tag)


# --------------------------------------------------------------------------- #
# An existing Ray cluster (``ray start``) for the simulation engine
# --------------------------------------------------------------------------- #
#: Ray writes this line into a worker's ``worker-*.out`` when it becomes an actor.
_ACTOR_NAME_LINE = ":actor_name:{}"
_RAY_STARTED = "Ray runtime started."


_TASKS_PER_NODE = """
import collections, json, sys
import ray
from ray._private.state import state
from ray.core.generated import gcs_pb2

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
tasks = collections.defaultdict(collections.Counter)
for raw in state._connect_and_get_accessor().get_task_events():
    event = gcs_pb2.TaskEvents.FromString(raw)
    node = event.state_updates.node_id or event.task_info.node_id
    if event.task_info.name and node:
        tasks[node.hex()][event.task_info.name] += 1
nodes = [
    {"id": n["NodeID"], "socket": n["ObjectStoreSocketName"], "tasks": tasks[n["NodeID"]]}
    for n in ray.nodes()
]
ray.shutdown()
print(json.dumps(nodes))
"""


@dataclass
class RayCluster:
    """A Ray cluster of ``ray start --block`` processes, one per node, all local.

    Each node has its own ``--temp-dir``, so each raylet writes the logs of the
    workers (actors) it runs into its own ``<temp dir>/session_latest/logs``:
    that is how a test tells which node ran what.
    """

    #: GCS ``host:port`` as Ray reports it (``ray_current_cluster``); what
    #: ``ray start --address`` and ``RAY_ADDRESS`` take. Ray replaces 127.0.0.1
    #: by the machine's IP (``services.resolve_ip_for_localhost``).
    address: str
    node_temp_dirs: list[Path]  # [head, worker-1, ...]
    log_dir: Path
    env: dict[str, str]
    tag: str
    processes: list[ManagedProcess] = field(default_factory=list)

    def logs(self, max_chars: int = 20_000) -> str:
        """The ``ray start`` outputs (each truncated to its last ``max_chars``)."""
        parts = []
        for proc in self.processes:
            text = proc.log_text()[-max_chars:]
            parts.append(f"===== {proc.name} (pid {proc.pid}) log =====\n{text}")
        return "\n".join(parts)

    def node_log_dirs(self) -> list[Path]:
        """Each node's Ray log dir (``<temp dir>/session_latest/logs``), head first."""
        return [d / "session_latest" / "logs" for d in self.node_temp_dirs]

    def actor_logs(self, class_name: str) -> list[list[Path]]:
        """Per node (head first): the worker stdout logs of ``class_name`` actors.

        Dead workers' logs move to ``logs/old``; both places are searched.
        """
        needle = _ACTOR_NAME_LINE.format(class_name)
        found: list[list[Path]] = []
        for logs in self.node_log_dirs():
            hits = []
            for path in sorted(logs.rglob("worker-*.out")):
                with contextlib.suppress(OSError):
                    head = path.read_text(encoding="utf-8", errors="replace")[:4096]
                    if needle in head.splitlines():
                        hits.append(path)
            found.append(hits)
        return found

    def tasks_per_node(self, timeout: float = 120.0) -> list[dict[str, int]]:
        """Per node (head first): ``{task name: count}`` of the tasks it ran.

        Read from the task events the GCS keeps (what ``ray list tasks`` shows;
        that CLI needs ``ray[default]``'s dashboard, so this reads them through a
        short-lived driver instead). A node is told by its plasma socket, which
        lies in its own temp dir.
        """
        out = subprocess.run(
            [sys.executable, "-c", _TASKS_PER_NODE, self.address],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            start_new_session=True,
        )
        try:
            by_node = json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as err:
            raise FlwrHarnessError(f"cannot read task events: {out.stdout}{out.stderr}") from err
        found: list[dict[str, int]] = []
        for temp_dir in self.node_temp_dirs:
            found.append({})
            for node in by_node:
                if node["socket"].startswith(f"{temp_dir}{os.sep}"):
                    found[-1] = node["tasks"]
        return found

    def status(self, timeout: float = 60.0) -> str:
        """``ray status --address <address>`` (nodes, CPUs in use)."""
        out = subprocess.run(
            [str(flwr_bin_dir() / "ray"), "status", "--address", self.address],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            start_new_session=True,
        )
        return out.stdout + out.stderr


def _free_port_args(*flags: str) -> list[str]:
    args: list[str] = []
    for flag in flags:
        args += [flag, str(free_port())]
    return args


#: Ports a node opens; each gets a free one so that two nodes on one machine, or
#: another user's Ray, never collide (several default to fixed numbers).
_NODE_PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)


@contextlib.contextmanager
def ray_cluster(
    log_dir: Path,
    num_workers: int = 1,
    *,
    num_cpus: int = 1,
    startup_timeout: float = 120.0,
) -> Iterator[RayCluster]:
    """Start a Ray head plus ``num_workers`` worker nodes on this machine.

    Each node is ``ray start --block`` (its own session, its own free ports,
    ``--num-cpus num_cpus``, its own short temp dir under ``/tmp``: Ray's
    AF_UNIX socket paths would exceed 107 bytes under pytest's ``tmp_path``).
    ``ray start`` output goes to ``log_dir``, and on exit each node's Ray logs
    are copied to ``log_dir/head``, ``log_dir/worker-<i>``. Every node is stopped by
    PID -- SIGTERM to the blocking ``ray start`` stops its raylet, GCS and
    workers; leftovers get SIGKILL -- workers first, then the head. Never
    ``ray stop``: it kills every Ray process of the user on the machine.
    """
    log_dir = Path(log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    root = _short_tmp_dir("flwr-raycl-")
    tag = uuid.uuid4().hex
    env = _ray_env(tag)
    env["RAY_TMPDIR"] = str(root / "cli")  # for `ray status` & co., never /tmp/ray
    ray = str(flwr_bin_dir() / "ray")
    common = ["--block", "--num-cpus", str(int(num_cpus)), "--disable-usage-stats"]
    cluster = RayCluster("", [], log_dir, env, tag)
    node_names = ["head", *(f"worker-{i}" for i in range(1, num_workers + 1))]
    try:
        head_dir = root / "head"
        head = _start(
            "ray-head",
            [
                ray,
                "start",
                "--head",
                "--port",
                str(free_port()),
                "--temp-dir",
                str(head_dir),
                "--include-dashboard",
                "false",
                *_free_port_args("--ray-client-server-port", *_NODE_PORT_FLAGS),
                *common,
            ],
            env,
            root,
            log_dir,
        )
        cluster.processes.append(head)
        cluster.node_temp_dirs.append(head_dir)
        _wait_until(lambda: _RAY_STARTED in head.log_text(), head, startup_timeout, cluster)
        cluster.address = (head_dir / "ray_current_cluster").read_text().strip()
        for i in range(1, num_workers + 1):
            node_dir = root / f"worker-{i}"
            node = _start(
                f"ray-worker-{i}",
                [
                    ray,
                    "start",
                    "--address",
                    cluster.address,
                    "--temp-dir",
                    str(node_dir),
                    *_free_port_args(*_NODE_PORT_FLAGS),
                    *common,
                ],
                env,
                root,
                log_dir,
            )
            cluster.processes.append(node)
            cluster.node_temp_dirs.append(node_dir)
            _wait_until(lambda n=node: _RAY_STARTED in n.log_text(), node, startup_timeout, cluster)
        yield cluster
    finally:
        try:
            stop_processes(cluster.processes, tag)
        finally:
            for name, logs in zip(node_names, cluster.node_log_dirs(), strict=False):
                with contextlib.suppress(OSError):
                    shutil.copytree(logs, log_dir / name, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- #
# flwr run
# --------------------------------------------------------------------------- #
def format_config_args(values: Mapping[str, Any]) -> str:
    """Format ``{"k": v}`` as ``'k=v k2="s"'`` (TOML literals) for CLI flags.

    Used for ``--node-config`` and ``--federation-config``. Strings containing
    whitespace or quotes are fragile in this format; :func:`flwr_run` passes run
    config through a TOML file instead.
    """
    parts = []
    for key, value in values.items():
        literal = tomli_w.dumps({"v": value}).split("=", 1)[1].strip()
        parts.append(f"{key}={literal}")
    return " ".join(parts)


class FlwrRunResult(subprocess.CompletedProcess[str]):
    """``CompletedProcess`` of ``flwr run`` plus the run id and final run status."""

    run_id: int | None = None
    #: ``flwr ls`` status, e.g. ``finished:completed`` / ``finished:failed``.
    status: str | None = None
    #: e.g. ``"ServerApp failed with exception: ..."`` (``"N/A"`` on success).
    status_details: str | None = None


def run_status(fed: FlwrFederation, run_id: int, timeout: float = 30.0) -> dict[str, Any]:
    """Return the ``flwr ls <conn> --run-id <id> --format json`` entry of a run."""
    cmd = [str(flwr_bin_dir() / "flwr"), "ls", fed.connection, "--run-id", str(run_id)]
    out = subprocess.run(
        [*cmd, "--format", "json"],
        env=fed.env,
        cwd=fed.work_dir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        start_new_session=True,
    )
    text = out.stdout
    try:
        payload = json.loads(text[text.index("{") : text.rindex("}") + 1])
        return dict(payload["runs"][0])
    except (ValueError, KeyError, IndexError) as err:
        raise FlwrHarnessError(f"cannot parse `flwr ls` output: {text}{out.stderr}") from err


def _check_app_dir(app_dir: Path) -> None:
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise FlwrHarnessError(f"no pyproject.toml in {app_dir}")
    with pyproject.open("rb") as fh:
        config = tomllib_load(fh)
    if "federations" in config.get("tool", {}).get("flwr", {}):
        # `flwr run` would migrate it into $FLWR_HOME/config.toml AND rewrite the
        # app's pyproject.toml (commenting the section out). Refuse instead.
        raise FlwrHarnessError(
            f"{pyproject} has [tool.flwr.federations]; flwr 1.41 would rewrite the file. "
            "Federations live in $FLWR_HOME/config.toml now; remove the section."
        )


def stage_app(app_dir: Path, dest: Path, paths: Sequence[str]) -> Path:
    """Copy ``pyproject.toml`` + ``paths`` (files/dirs) of an app into ``dest``.

    Optional speed/hermeticity aid: ``flwr run`` walks the *whole* app dir
    (including ``.venv``) to build the FAB, which takes seconds for a repo root
    with a venv, and ships whatever ``*.py``/``*.toml``/... files are there.
    ``__pycache__`` dirs are skipped. Returns ``dest``.
    """
    app_dir, dest = Path(app_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for rel in ("pyproject.toml", *paths):
        src = app_dir / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=ignore, dirs_exist_ok=True)
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def flwr_run(
    app_dir: Path,
    federation: FlwrFederation,
    run_config: Mapping[str, Any] | None = None,
    timeout: float = 600.0,
    *,
    federation_config: Mapping[str, Any] | None = None,
    check: bool = True,
    extra_args: Sequence[str] = (),
) -> FlwrRunResult:
    """Run ``flwr run <app_dir> <connection> --stream`` and wait for the run to end.

    ``FLWR_HOME`` etc. come from ``federation.env``; cwd is ``federation.work_dir``.
    ``run_config`` overrides are written to a TOML file and passed as
    ``--run-config <file>.toml`` (keys must exist in ``[tool.flwr.app.config]``,
    else ``flwr run`` exits 1 with "Invalid run configuration"; the override's
    TOML type wins, e.g. ``lr=1`` arrives as ``int``). In simulation mode
    ``--federation-config`` carries ``federation.federation_config`` updated with
    ``federation_config`` (e.g. ``{"num-supernodes": 4}``).

    Returns a :class:`FlwrRunResult` (stdout and stderr merged in ``stdout``)
    with ``run_id`` and ``status``. ``flwr run --stream`` itself exits 0 even
    when the ServerApp raised, so with ``check=True`` this raises
    :class:`FlwrHarnessError` (with all process logs) on timeout, non-zero exit,
    or a status other than ``finished:completed``. Note: ClientApp exceptions do
    NOT fail a run -- the strategy just gets error replies -- so tests should
    also assert on the app's own outputs.
    """
    app_dir = Path(app_dir).resolve()
    _check_app_dir(app_dir)
    cmd = [str(flwr_bin_dir() / "flwr"), "run", str(app_dir), federation.connection, "--stream"]
    fed_cfg = {**federation.federation_config, **(federation_config or {})}
    if fed_cfg:
        cmd += ["--federation-config", format_config_args(fed_cfg)]
    cfg_file: Path | None = None
    if run_config:
        fd, name = tempfile.mkstemp(prefix="run-config-", suffix=".toml", dir=federation.log_dir)
        with os.fdopen(fd, "wb") as fh:
            tomli_w.dump(dict(run_config), fh)
        cfg_file = Path(name)
        cmd += ["--run-config", str(cfg_file)]
    cmd += list(extra_args)

    proc = subprocess.Popen(
        cmd,
        cwd=federation.work_dir,
        env=federation.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        # The run itself keeps going server-side until the federation is stopped.
        raise FlwrHarnessError(
            f"`flwr run` timed out after {timeout:.0f}s: {cmd}\n--- flwr run output ---\n"
            f"{out}\n{federation.logs()}"
        ) from None
    finally:
        if cfg_file is not None:
            cfg_file.unlink(missing_ok=True)

    result = FlwrRunResult(cmd, proc.returncode, out, None)
    match = _RUN_ID_RE.search(out or "")
    result.run_id = int(match.group(1)) if match else None
    if result.run_id is not None and proc.returncode == 0:
        # The log stream can end a moment before the status flips to finished.
        deadline = time.monotonic() + 30.0
        while True:
            info = run_status(federation, result.run_id)
            result.status = str(info.get("status"))
            result.status_details = str(info.get("status-details") or "")
            if result.status.startswith("finished") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    if check and (proc.returncode != 0 or result.status != RUN_COMPLETED):
        raise FlwrHarnessError(
            f"`flwr run` failed (rc={proc.returncode}, run_id={result.run_id}, "
            f"status={result.status}: {result.status_details})\n"
            f"--- flwr run output ---\n{out}\n{federation.logs()}"
        )
    return result


def serverapp_pids(federation: FlwrFederation) -> set[int]:
    """PIDs of the ServerApp processes (``flwr-serverapp``) the federation's SuperLink runs."""
    table = _proc_table()
    roots = [p.pid for p in federation.processes]
    found = set()
    for pid in _descendants(roots, table):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if any(Path(a.decode(errors="replace")).name == "flwr-serverapp" for a in args[:2]):
            found.add(pid)
    return found
