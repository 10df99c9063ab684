"""A throwaway two-node SLURM cluster on this machine, for tests of ``slurm/``.

    from tests.slurm_cluster import SlurmCluster, missing_binaries

    with SlurmCluster.start(nodes=2, cpus_per_node=4) as cluster:
        job = cluster.sbatch(["-N", "2", "slurm/train_rec.sh", "cfg.yaml"], env={...})
        cluster.wait_state(job, {"COMPLETED"})

It runs its own ``munged`` (key, socket, pid, log and seed files in a temporary folder),
``slurmctld`` and one ``slurmd -N n<i>`` per node, every one with ``-f`` a generated
``slurm.conf``: nodes ``n1``, ``n2``, ... share this host (``NodeHostname``) and
``NodeAddr=127.0.0.1`` and differ by ``Port``; the spool, pid and log files of ``slurmd``
end in ``%n``. Client commands get ``SLURM_CONF`` through :meth:`SlurmCluster.env`.
Ports are free ones picked at start, so several clusters (several test workers) can run
side by side. ``cred_expire=5`` and ``sched_interval=1`` make a requeued job start again
within seconds (SLURM's defaults hold it back for two minutes).

:meth:`SlurmCluster.stop` cancels the cluster's jobs, stops the daemons it started (by their
pid files) and then kills what is left of its jobs: processes whose environment names this
cluster's ``slurm.conf`` (``slurmstepd`` outlives ``slurmd``). It never touches other processes.
Daemons run as the current user (``SlurmUser`` = that user); CI runs as root.
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "scontrol", "squeue",
            "scancel")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def which(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin folders (daemons live there, often off PATH)."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    """SLURM / munge programs this machine lacks (``apt-get install slurm-wlm munge``)."""
    return [b for b in BINARIES if which(b) is None]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class ClusterError(RuntimeError):
    """The cluster did not come up, or a command failed; the message carries the daemon logs."""


class SlurmCluster:
    """A running cluster; use :meth:`start` (also a context manager)."""

    def __init__(self, root: Path, nodes: int, cpus_per_node: int, gpus_per_node: int = 0) -> None:
        self.root = root
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node
        self.gpus_per_node = gpus_per_node
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self._pid_files: list[Path] = []

    # ------------------------------------------------------------------ life cycle
    @classmethod
    def start(cls, nodes: int = 2, cpus_per_node: int = 4, gpus_per_node: int = 0,
              timeout: float = 60) -> "SlurmCluster":
        """Write the configuration, start ``munged``, ``slurmctld`` and the ``slurmd``\\ s; wait
        until every node is idle. Stops whatever it started if that fails.

        ``gpus_per_node`` declares that many GPUs per node as a count-only GRES (no devices):
        jobs can ask for them (``--gpus-per-node``) and see ``SLURM_GPUS_ON_NODE``, nothing more."""
        missing = missing_binaries()
        if missing:
            raise ClusterError(f"missing SLURM/munge programs: {', '.join(missing)}")
        # munged wants every folder on the socket's path searchable by all: not a 0700 pytest tmp
        root = Path(tempfile.mkdtemp(prefix="megarec-slurm-"))
        root.chmod(0o755)
        cluster = cls(root, nodes, cpus_per_node, gpus_per_node)
        try:
            cluster._start_munge()
            cluster._write_conf()
            cluster._start_slurm(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def __enter__(self) -> "SlurmCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir()
        d.chmod(0o755)
        key = d / "munge.key"
        subprocess.run([which("mungekey"), "--create", "--keyfile", str(key)], check=True, capture_output=True)
        key.chmod(0o600)
        pid = d / "munged.pid"
        self._run_daemon([which("munged"), f"--socket={self.munge_socket}", f"--key-file={key}",
                          f"--pid-file={pid}", f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"],
                         pid, d / "munged.log")

    def _write_conf(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log"):
            (r / sub).mkdir()
        ctld_port, d_port, *node_ports = _free_ports(2 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        user = getpass.getuser()
        lines = [
            "ClusterName=megarectest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmdPidFile={r}/slurmd.%n.pid",
            f"SlurmdLogFile={r / 'log'}/slurmd.%n.log",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmctldLogFile={r / 'log'}/slurmctld.log",
            "SlurmdParameters=config_overrides",       # nodes may claim more CPUs than the host has
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobRequeue=1",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "KillWait=30",                           # seconds between SIGTERM and SIGKILL
            "MinJobAge=600",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        gres = ""
        if self.gpus_per_node:
            lines.append("GresTypes=gpu")
            gres = f" Gres=gpu:{self.gpus_per_node}"
            # SLURM drops GPUs without device files: plain files stand in for /dev/nvidia<i>
            for i in range(self.gpus_per_node):
                (r / f"fakegpu{i}").touch()
            (r / "gres.conf").write_text(f"Name=gpu File={r}/fakegpu[0-{self.gpus_per_node - 1}]\n")
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} RealMemory=1000{gres} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_slurm(self, timeout: float) -> None:
        self._run_daemon([which("slurmctld"), "-f", str(self.conf)], self.root / "slurmctld.pid",
                         self.root / "log" / "slurmctld.log")
        for n in self.nodes:
            self._run_daemon([which("slurmd"), "-f", str(self.conf), "-N", n], self.root / f"slurmd.{n}.pid",
                             self.root / "log" / f"slurmd.{n}.log")
        deadline = time.time() + timeout
        while True:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            if time.time() > deadline:
                raise ClusterError(f"nodes not idle after {timeout:.0f} s: {states}\n{self.logs()}")
            time.sleep(0.5)

    def _run_daemon(self, cmd: list[str], pid_file: Path, log: Path) -> None:
        """Start a daemon that forks into the background; remember its pid file."""
        self._pid_files.append(pid_file)
        res = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        deadline = time.time() + 20
        while not (pid_file.is_file() and pid_file.read_text().strip()):
            if res.returncode != 0 or time.time() > deadline:
                tail = log.read_text()[-3000:] if log.is_file() else ""
                raise ClusterError(f"{' '.join(cmd)} failed (exit {res.returncode}): {res.stderr}\n{tail}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Cancel every job, stop the daemons this cluster started, kill its leftover job
        processes, remove the state folder. Safe to call twice."""
        if not self.root.exists():
            return
        if self.conf.is_file() and self._daemon_pids():
            self.run(["scancel", "--partition=debug"], check=False)
            deadline = time.time() + 20
            while time.time() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                time.sleep(0.5)
        pids = self._daemon_pids()
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        for pid in self._job_processes():
            _signal(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def _daemon_pids(self) -> list[int]:
        pids = []
        for f in self._pid_files:
            try:
                pids.append(int(f.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        return [p for p in pids if _alive(p)]

    def _job_processes(self) -> list[int]:
        """Processes (slurmstepd, batch scripts, tasks) whose environment names this cluster's conf."""
        mark = f"SLURM_CONF={self.conf}".encode()
        mine = {os.getpid(), os.getppid()}
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) in mine:
                continue
            try:
                if mark in (d / "environ").read_bytes().split(b"\0"):
                    out.append(int(d.name))
            except OSError:
                continue
        return out

    # ------------------------------------------------------------------ client side
    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """This process's environment with ``SLURM_CONF`` pointing at the cluster (plus ``extra``)."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        env["PATH"] = env.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
        env.update(extra or {})
        return env

    def run(self, cmd: list[str], env: dict[str, str] | None = None, check: bool = True,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        res = subprocess.run(cmd, env=self.env(env), capture_output=True, text=True, cwd=cwd, timeout=60)
        if check and res.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)}: exit {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    def sbatch(self, args: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None) -> int:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        fields = {}
        for tok in out.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait_state(self, job_id: int, states: Iterable[str], timeout: float = 300,
                   log: Path | None = None) -> dict[str, str]:
        """Wait until the job is in one of ``states``; a job that ends in another state fails."""
        want = set(states)
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE"}
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in want:
                return info
            if state in final or time.time() > deadline:
                text = log.read_text()[-6000:] if log is not None and log.is_file() else ""
                raise ClusterError(f"job {job_id} is {state}, waited for {sorted(want)} "
                                   f"(exit {info.get('ExitCode')}, restarts {info.get('Restarts')})\n{text}")
            time.sleep(0.5)

    def logs(self) -> str:
        """The tails of the daemons' logs (for failure messages)."""
        parts = []
        for f in sorted((self.root / "log").glob("*.log")) + [self.root / "munge" / "munged.log"]:
            if f.is_file():
                parts.append(f"== {f.name}\n{f.read_text()[-2000:]}")
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
