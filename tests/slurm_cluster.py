"""A throwaway one-node Slurm cluster on this machine, for tests.

The cluster is private to the test session: its own ``slurm.conf``, state and
spool directories, logs, munge key and munge socket all live in one run
directory under ``$TMPDIR/skystack-slurm/``, its daemons listen on freshly
picked free ports, and they run as root. Apart from installing the packages,
nothing under ``/etc`` is used or changed, and a site installation of Slurm or
munge on the same machine (its daemons, sockets, key) is left alone.

Typical use from a test module::

    from slurm_cluster import slurm_cluster, run_snakemake_on_slurm  # noqa: F401

    @pytest.mark.slurm
    def test_something(slurm_cluster, tmp_path):
        proc = run_snakemake_on_slurm(tmp_path, snakefile, profile_dir, ["--configfile", cfg])

Outside pytest, :class:`LocalSlurmCluster` is a context manager::

    with LocalSlurmCluster() as cluster:
        subprocess.run(["sbatch", "--wrap", "hostname"], env=cluster.env)

Bring-up installs Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and
``munge`` when they are missing (only as root and only where ``apt-get``
exists); where that cannot be done, :class:`SlurmUnavailable` is raised and the
pytest fixture turns it into a skip with the reason.

Leftovers of an earlier session that was killed before it could stop its
daemons are found by a marker in the daemons' environment and stopped at the
next bring-up; daemons of a session that is still alive are never touched.
"""
from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
#: programs the cluster needs, and the Debian package that brings each
PROGRAMS = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "squeue": "slurm-client",
    "sinfo": "slurm-client",
    "scontrol": "slurm-client",
    "scancel": "slurm-client",
    "srun": "slurm-client",
    "munged": "munge",
}
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
BASE_DIR = Path(tempfile.gettempdir()) / "skystack-slurm"
MARKER = "SKYSTACK_SLURM_RUN"  # environment marker carried by every daemon we start
PARTITION = "debug"
CLUSTER_NAME = "skystack"
REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or run on this machine (tests should skip)."""


class SlurmStartError(RuntimeError):
    """The daemons were started but the cluster did not come up (tests should fail)."""


# ----------------------------------------------------------------------------
# installation
# ----------------------------------------------------------------------------
def which(program: str) -> str | None:
    """Locate ``program`` on PATH or in the sbin directories root normally has."""
    found = shutil.which(program)
    if found:
        return found
    for d in SBIN_DIRS:
        candidate = Path(d) / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing_packages() -> list[str]:
    """Debian packages whose programs are not installed here."""
    return sorted({pkg for prog, pkg in PROGRAMS.items() if which(prog) is None})


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def _no_service_starts():
    """Keep package scripts from starting the system's own munge/slurm services.

    Debian's maintainer scripts ask ``/usr/sbin/policy-rc.d`` before starting a
    service; exit status 101 means "not allowed". The file is only put in place
    when there is none, and removed again afterwards.
    """
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)


def ensure_slurm_installed(timeout: float = 900.0) -> float:
    """Install the Slurm and munge packages where missing; return the seconds spent.

    Raises :class:`SlurmUnavailable` when they are missing and this process
    cannot install them (not root, no apt-get) or the installation fails.
    """
    missing = missing_packages()
    if not missing:
        return 0.0
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"Slurm packages {missing} are not installed and installing them needs root "
            f"(running as uid {os.geteuid()})")
    apt_get = which("apt-get")
    if apt_get is None:
        raise SlurmUnavailable(f"Slurm packages {missing} are not installed and there is no apt-get here")
    start = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}
    install = [apt_get, "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300",
               "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
               "install", *PACKAGES]
    with _file_lock(BASE_DIR / "install.lock"):
        if not missing_packages():  # another session installed them meanwhile
            return time.monotonic() - start
        with _no_service_starts():
            proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                # a fresh machine may have empty package lists: refresh them once and retry
                upd = subprocess.run([apt_get, "-q", "-o", "DPkg::Lock::Timeout=300", "update"], env=env,
                                     capture_output=True, text=True, timeout=timeout)
                proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
                if proc.returncode != 0:
                    raise SlurmUnavailable(
                        f"apt-get could not install {' '.join(PACKAGES)} (exit {proc.returncode}):\n"
                        f"{upd.stdout[-1500:]}{upd.stderr[-1500:]}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    still = missing_packages()
    if still:
        raise SlurmUnavailable(f"after apt-get install, these packages' programs are still missing: {still}")
    return time.monotonic() - start


# ----------------------------------------------------------------------------
# helpers: ports, processes, machine size
# ----------------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _proc_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def _pids_with_marker(run_dir: Path) -> list[int]:
    """Processes started for ``run_dir`` (daemons, and the job steps they spawned)."""
    mine = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != mine:
            if _proc_environ(int(entry.name)).get(MARKER) == str(run_dir):
                pids.append(int(entry.name))
    return pids


def _with_descendants(pids: list[int]) -> list[int]:
    """``pids`` and every process below them (job scripts run under slurmstepd)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out and pid != os.getpid():
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is as good as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pids: list[int], grace: float = 10.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def cleanup_stale_runs(base_dir: Path = BASE_DIR) -> list[Path]:
    """Stop daemons left by earlier sessions that died, and remove their run directories.

    A run directory belongs to the process whose pid is in its ``owner`` file;
    while that process lives, the run is left alone.
    """
    removed = []
    if not base_dir.is_dir():
        return removed
    for run_dir in sorted(base_dir.glob("run-*")):
        try:
            owner = int((run_dir / "owner").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            owner = None
        if owner is not None and owner != os.getpid() and _pid_alive(owner):
            continue
        conf = run_dir / "etc" / "slurm.conf"
        scancel = which("scancel")
        if conf.exists() and scancel and _pids_with_marker(run_dir):
            try:  # let the old controller end its jobs cleanly, if it still runs
                subprocess.run([scancel, "--full", "--quiet", "-u", "root"], env={**os.environ, "SLURM_CONF": str(conf)},
                               capture_output=True, timeout=10)
                time.sleep(1.0)
            except (subprocess.TimeoutExpired, OSError):
                pass
        _terminate(_with_descendants(_pids_with_marker(run_dir)), grace=5.0)
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(run_dir)
    return removed


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 2048


def _tail(path: Path, n: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no file)"
    return text[-n:] if text else "(empty)"


# ----------------------------------------------------------------------------
# the cluster
# ----------------------------------------------------------------------------
class LocalSlurmCluster:
    """One-node Slurm cluster (controller and compute node are this host).

    Parameters
    ----------
    base_dir : Path
        Parent of the per-run directory.
    cpus, real_memory_mb : int, optional
        Node size; default: this machine's CPUs and 90 % of its memory.
    min_job_age_s : int
        How long finished jobs stay visible to ``squeue`` (the workflow polls
        job status with ``squeue`` because there is no accounting database).
    start_timeout_s : float
        How long to wait for the node to show up idle in ``sinfo``.
    """

    def __init__(self, base_dir: Path = BASE_DIR, cpus: int | None = None, real_memory_mb: int | None = None,
                 min_job_age_s: int = 600, start_timeout_s: float = 90.0):
        self.base_dir = Path(base_dir)
        self.cpus = cpus or _cpu_count()
        self.real_memory_mb = real_memory_mb or max(256, int(_mem_total_mb() * 0.9))
        self.min_job_age_s = min_job_age_s
        self.start_timeout_s = start_timeout_s
        self.hostname = socket.gethostname().split(".")[0]
        self.run_dir: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.install_seconds = 0.0
        self.startup_seconds = 0.0
        self._saved_slurm_conf: str | None = None
        self._exported = False

    # paths -----------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.run_dir / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.run_dir / "munge" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands (``sbatch``, ``squeue``, snakemake)."""
        env = {k: v for k, v in os.environ.items() if k != MARKER}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([str(self.run_dir / "bin"), env.get("PATH", "/usr/bin:/bin"), *SBIN_DIRS])
        return env

    def log_paths(self) -> dict[str, Path]:
        return {name: self.run_dir / "log" / f"{name}.log" for name in ("munged", "slurmctld", "slurmd")}

    def logs(self, n: int = 4000) -> str:
        """The tails of the daemons' logs, for error messages."""
        if self.run_dir is None:
            return "(cluster never started)"
        return "\n".join(f"----- {name} ({path}) -----\n{_tail(path, n)}" for name, path in self.log_paths().items())

    # configuration ---------------------------------------------------------
    def slurm_conf_text(self, ctld_port: int, slurmd_port: int) -> str:
        d = self.run_dir
        return f"""\
# Written for a throwaway one-node test cluster; see tests/slurm_cluster.py.
ClusterName={CLUSTER_NAME}
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
PropagateResourceLimits=NONE
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge={self.min_job_age_s}
KillWait=5
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=120
MailProg=/bin/true
NodeName={self.hostname} NodeAddr=127.0.0.1 NodeHostname={self.hostname} CPUs={self.cpus} RealMemory={self.real_memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""

    def _prepare(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base_dir, 0o755)
        cleanup_stale_runs(self.base_dir)
        self.run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=self.base_dir))
        os.chmod(self.run_dir, 0o755)
        (self.run_dir / "owner").write_text(f"{os.getpid()}\n")
        for sub in ("etc", "state", "spool", f"spool/{self.hostname}", "run", "log"):
            (self.run_dir / sub).mkdir(mode=0o755)
        (self.run_dir / "munge").mkdir(mode=0o700)
        key = self.run_dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(self.slurm_conf_text(ctld_port, slurmd_port))
        self._write_client_wrappers()

    def _write_client_wrappers(self) -> None:
        """Put ``srun`` (and friends) on PATH with this cluster's SLURM_CONF as fallback.

        Inside a job, snakemake's slurm-jobstep executor starts ``srun`` with
        every ``SLURM_*`` variable except a few job ids removed, SLURM_CONF
        included; on a real cluster srun then reads /etc/slurm/slurm.conf.
        This cluster leaves /etc alone, so the wrappers supply the path.
        """
        bin_dir = self.run_dir / "bin"
        bin_dir.mkdir(mode=0o755)
        for prog in ("srun", "sbatch", "squeue", "scancel", "sinfo", "scontrol"):
            real = which(prog)
            if real is None:
                continue
            wrapper = bin_dir / prog
            wrapper.write_text(f'#!/bin/sh\nexport SLURM_CONF="${{SLURM_CONF:-{self.conf}}}"\nexec {real} "$@"\n')
            wrapper.chmod(0o755)

    def _spawn(self, name: str, argv: list[str]) -> None:
        env = {**self.env, MARKER: str(self.run_dir)}
        out = open(self.run_dir / "log" / f"{name}.stdout", "ab")
        try:
            self.procs[name] = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True,
                                                cwd=self.run_dir)
        finally:
            out.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SlurmStartError(
                    f"{name} exited with status {proc.returncode} during bring-up\n"
                    f"{name} stdout:\n{_tail(self.run_dir / 'log' / f'{name}.stdout')}\n{self.logs()}")

    def _wait_for(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            ok, last = ready()
            if ok:
                return
            time.sleep(0.25)
        raise SlurmStartError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})\n{self.logs()}")

    def _client(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([which(argv[0]) or argv[0], *argv[1:]], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def node_state(self) -> str:
        proc = self._client("sinfo", "-h", "-N", "-n", self.hostname, "-o", "%T")
        return (proc.stdout.strip() or proc.stderr.strip()).lower()

    def start(self) -> "LocalSlurmCluster":
        """Install if needed, write the configuration, start the daemons, wait for an idle node."""
        if self.procs:
            return self
        if os.geteuid() != 0:
            raise SlurmUnavailable(f"the test cluster runs its daemons as root; running as uid {os.geteuid()}")
        self.install_seconds = ensure_slurm_installed()
        t0 = time.monotonic()
        self._prepare()
        try:
            self._spawn("munged", [which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                                   f"--key-file={self.run_dir / 'munge' / 'munge.key'}",
                                   f"--pid-file={self.run_dir / 'run' / 'munged.pid'}",
                                   f"--seed-file={self.run_dir / 'munge' / 'munge.seed'}",
                                   f"--log-file={self.run_dir / 'log' / 'munged.log'}", "--num-threads=2"])
            self._wait_for("the munge socket", lambda: (self.munge_socket.exists(), "no socket yet"), 20)
            self._spawn("slurmctld", [which("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)])
            self._wait_for("slurmctld to answer", self._ctld_ready, 45)
            self._spawn("slurmd", [which("slurmd"), "-D", "-N", self.hostname, "-f", str(self.conf)])
            self._wait_for(f"node {self.hostname} to be idle", self._node_idle, self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        self.export()
        atexit.register(self.stop)
        return self

    def _ctld_ready(self):
        proc = self._client("scontrol", "ping")
        return ("UP" in proc.stdout, (proc.stdout + proc.stderr).strip())

    def _node_idle(self):
        state = self.node_state()
        if any(s in state for s in ("down", "drain", "fail", "inval")) and "not responding" not in state:
            # a node that registered with a bad state: try to bring it back once per poll
            self._client("scontrol", "update", f"nodename={self.hostname}", "state=resume")
        return (state.startswith("idle"), state)

    def export(self) -> None:
        """Point this process's (and so its children's) Slurm clients at this cluster."""
        if not self._exported:
            self._saved_slurm_conf = os.environ.get("SLURM_CONF")
            self._exported = True
        os.environ["SLURM_CONF"] = str(self.conf)

    def _unexport(self) -> None:
        if not self._exported:
            return
        if self._saved_slurm_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._saved_slurm_conf
        self._exported = False

    def stop(self) -> None:
        """Cancel remaining jobs, stop the daemons this object started, and remove the run directory."""
        if self.run_dir is None:
            return
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                self._client("scancel", "--full", "--quiet", "-u", "root", timeout=15)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    if not self._client("squeue", "-h", "-t", "PD,R,CG", "-o", "%i", timeout=10).stdout.strip():
                        break
                    time.sleep(0.3)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                _terminate([proc.pid], grace=10.0)
            if proc is not None:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        # job steps (slurmstepd) and anything else that carries this run's marker
        _terminate(_with_descendants(_pids_with_marker(self.run_dir)), grace=5.0)
        self.procs.clear()
        self._unexport()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir = None

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # conveniences ---------------------------------------------------------
    def sbatch(self, *args: str, cwd=None) -> str:
        """Submit with ``sbatch --parsable``; return the job id."""
        proc = subprocess.run([which("sbatch"), "--parsable", *args], env=self.env, cwd=cwd,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        proc = self._client("squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T")
        return proc.stdout.strip()

    def wait_job(self, job_id: str, timeout: float = 120) -> str:
        """Wait until ``job_id`` leaves the queue's active states; return its final state."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state and state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state!r} after {timeout} s\n{self.logs()}")


# ----------------------------------------------------------------------------
# one cluster per test session
# ----------------------------------------------------------------------------
_SHARED: LocalSlurmCluster | None = None


def shared_cluster() -> LocalSlurmCluster:
    """The session's cluster, started on first use."""
    global _SHARED
    if _SHARED is None or not _SHARED.procs:
        cluster = LocalSlurmCluster()
        cluster.start()
        _SHARED = cluster
    return _SHARED


def stop_shared_cluster() -> None:
    global _SHARED
    if _SHARED is not None:
        _SHARED.stop()
        _SHARED = None


try:
    import pytest
except ImportError:  # the module also works as a plain library
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def slurm_cluster():
        """A running one-node Slurm cluster; ``SLURM_CONF`` is exported while it lives.

        Skips (with the reason) where Slurm cannot be installed or run. Import
        this fixture into any test module; all importers share one cluster.
        """
        try:
            cluster = shared_cluster()
        except SlurmUnavailable as exc:
            pytest.skip(f"no local Slurm cluster: {exc}")
        yield cluster
        stop_shared_cluster()


# ----------------------------------------------------------------------------
# snakemake on the cluster
# ----------------------------------------------------------------------------
#: settings that make a small workflow finish quickly on the test cluster
FAST_POLLING = {
    "slurm-init-seconds-before-status-checks": 2,
    "seconds-between-status-checks": 2,
    "slurm-keep-successful-logs": True,
}


def derive_profile(src_dir, dst_dir, updates: dict | None = None, cluster: LocalSlurmCluster | None = None,
                   drop_gpus: bool = True, mem_cap_mb: int | None = None) -> Path:
    """Copy a profile and adapt it to the local test cluster.

    - ``gpu``/``gres``/``gpu_model``/``constraint`` requests are removed (the
      test node has no GPUs; sbatch would reject ``--gpus``), unless
      ``drop_gpus`` is false;
    - ``mem_mb`` requests are capped at ``mem_cap_mb``; with ``cluster`` given
      the cap defaults to one CPU's share of its node's memory, so that jobs
      still run side by side, and ``set-threads`` are capped at its CPUs;
    - ``updates`` (top-level keys) are applied last.

    Returns the new profile directory (holding ``config.yaml``).
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    profile = yaml.safe_load((src_dir / "config.yaml").read_text()) or {}
    gpu_keys = {"gpu", "gpus", "gres", "gpu_model", "constraint"} if drop_gpus else set()
    if mem_cap_mb is None and cluster is not None:
        mem_cap_mb = max(256, cluster.real_memory_mb // cluster.cpus)

    def adapt(res: dict) -> dict:
        out = {}
        for key, value in (res or {}).items():
            if key in gpu_keys:
                continue
            if mem_cap_mb is not None and key in ("mem_mb", "mem_mib") and isinstance(value, (int, float)):
                value = min(int(value), mem_cap_mb)
            out[key] = value
        return out

    if "default-resources" in profile:
        dr = profile["default-resources"]
        if isinstance(dr, dict):
            profile["default-resources"] = adapt(dr)
        else:  # list of "key=value"
            profile["default-resources"] = [
                item for item in dr if item.split("=", 1)[0].strip() not in gpu_keys]
    if isinstance(profile.get("set-resources"), dict):
        profile["set-resources"] = {rule: adapt(res) for rule, res in profile["set-resources"].items()}
    if cluster is not None and isinstance(profile.get("set-threads"), dict):
        profile["set-threads"] = {rule: min(int(n), cluster.cpus) for rule, n in profile["set-threads"].items()}
    profile.update(updates or {})
    dst_dir.mkdir(parents=True, exist_ok=True)
    (dst_dir / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dst_dir


def run_snakemake_on_slurm(workdir, snakefile, profile_dir, extra_args=(), cluster: LocalSlurmCluster | None = None,
                           timeout: float = 900, check: bool = True, workflow_profile: str = "none",
                           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``snakemake --profile profile_dir`` (an ``executor: slurm`` profile) on the test cluster.

    Parameters
    ----------
    workdir : path
        ``--directory`` of the run (outputs, logs, ``.snakemake``).
    snakefile : path
        The workflow's Snakefile.
    profile_dir : path
        The profile to use; see :func:`derive_profile` to adapt the repository's
        ``profiles/slurm`` to the test cluster.
    extra_args : sequence
        More command-line arguments (``--configfile``, targets, ...).
    cluster : LocalSlurmCluster, optional
        Defaults to the session's shared cluster (started if needed). Its
        ``SLURM_CONF`` is passed on; ``--max-threads`` caps threads at its CPUs.
    workflow_profile : str
        Passed as ``--workflow-profile``; ``"none"`` (default) keeps a
        ``profiles/default`` next to the Snakefile from overriding the profile.
    check : bool
        Raise ``AssertionError`` with snakemake's output tail (and the daemon
        logs) when snakemake fails.
    """
    cluster = cluster or shared_cluster()
    cmd = [SNAKEMAKE, "-s", str(snakefile), "--directory", str(workdir), "--profile", str(profile_dir),
           "--workflow-profile", str(workflow_profile), "--max-threads", str(cluster.cpus),
           *map(str, extra_args)]
    proc = subprocess.run(cmd, cwd=str(workdir), capture_output=True, text=True, timeout=timeout,
                          env={**cluster.env, **(env or {})})
    if check and proc.returncode != 0:
        slurm_logs = ""
        found = [*Path(workdir).glob("logs/slurm/**/*.log"), *Path(workdir).glob(".snakemake/slurm_logs/**/*.log")]
        for log in sorted(found, key=lambda p: p.stat().st_mtime)[-5:]:
            slurm_logs += f"----- {log} -----\n{_tail(log, 2000)}\n"
        raise AssertionError(
            f"snakemake on slurm failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}\n"
            f"{slurm_logs}{cluster.logs(2000)}")
    return proc


if __name__ == "__main__":  # manual check: bring the cluster up, show it, take it down
    with LocalSlurmCluster() as c:
        print(f"install {c.install_seconds:.1f} s, bring-up {c.startup_seconds:.1f} s, conf {c.conf}")
        print(subprocess.run(["sinfo"], env=c.env, capture_output=True, text=True).stdout)
