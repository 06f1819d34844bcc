"""A real single-node SLURM cluster on this machine, for the tests (Debian's slurm-wlm 22.05:
slurmctld, slurmd, munge; `apt-get install slurmctld slurmd slurm-client munge`).

    python tests/slurm_cluster.py start DIR   # configure in DIR, start the daemons, wait for an idle node
    python tests/slurm_cluster.py stop DIR    # cancel its jobs, stop the daemons it started (pid files)

Everything lives in DIR: slurm.conf, state, spool, logs and pid files. Clients find the cluster
through SLURM_CONF=DIR/slurm.conf (set it, or use Cluster.env()); its ports (6917, 6918) differ from
SLURM's defaults, so a cluster already running on the machine is left alone. The node has this
machine's CPUs and memory (`slurmd -C`), no GPUs; processes are tracked without cgroups; jobs may
be requeued. munged is reused when one is running, else started as the munge user and stopped after.
Facts behind the settings: slurm.conf's comments below and ../shared/reference/slurm-local.md.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CONF = """ClusterName=ssltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire + 1 s later (the default, 120 s, stalls every requeue).
AuthInfo=cred_expire=10
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
# No cgroups on these machines (no systemd): track processes by /proc, no task binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
# Start jobs at once (the defaults wait seconds after a submit and up to 30 s after a requeue).
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
KillWait=5
OverTimeLimit=0
InactiveLimit=0
MinJobAge=300
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes={name} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, folder):
        self.dir = Path(folder).resolve()
        self.conf = self.dir / "slurm.conf"

    def env(self, base=None):
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd, check=True, timeout=30, cwd=None):
        return subprocess.run(list(map(str, cmd)), env=self.env(), capture_output=True, text=True, check=check,
                              timeout=timeout, cwd=cwd)

    # ---- start -------------------------------------------------------------------------------

    def start(self, timeout=60):
        for tool in ("slurmctld", "slurmd", "munged", "sbatch"):
            if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
                raise RuntimeError(f"{tool} not found: apt-get install slurmctld slurmd slurm-client munge")
        if os.geteuid() != 0:
            raise RuntimeError("slurmd must run as root to start jobs; run the SLURM tests as root (CI does)")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "state").mkdir(exist_ok=True)
        (self.dir / "spool").mkdir(exist_ok=True)
        host = socket.gethostname().split(".")[0]  # slurmctld runs only where its name is `hostname -s`
        try:
            socket.gethostbyname(host)
        except OSError:
            with open("/etc/hosts", "a") as f:
                f.write(f"127.0.0.1 {host}\n")
        # This machine's topology and memory, or the node is drained ("Low RealMemory", core count).
        node = subprocess.run([self._bin("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        node = next(line for line in node.splitlines() if line.startswith("NodeName="))
        name = re.match(r"NodeName=(\S+)", node).group(1)
        self.conf.write_text(CONF.format(host=host, dir=self.dir, node=node.strip(), name=name))
        self.node = name
        self._start_munge()
        subprocess.run([self._bin("slurmctld"), "-f", self.conf], env=self.env(), check=True)
        subprocess.run([self._bin("slurmd"), "-f", self.conf, "-N", name], env=self.env(), check=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            ping = self.run("scontrol", "ping", check=False)
            state = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if "UP" in ping.stdout and state.startswith("idle"):
                return self
            if state.startswith(("down", "drain")):  # state recovered from an earlier run
                self.run("scontrol", "update", f"NodeName={name}", "State=RESUME", check=False)
            time.sleep(0.3)
        raise RuntimeError(f"the SLURM node is not idle after {timeout} s; see {self.dir}/slurmctld.log and slurmd.log")

    def _bin(self, name):
        return shutil.which(name) or f"/usr/sbin/{name}"

    def _start_munge(self):
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # a munged is running already: use it, leave it running
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", self._bin("munged")], check=True)  # refuses root
        for _ in range(50):
            if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                pid = Path("/run/munge/munged.pid")
                if pid.exists():
                    shutil.copy(pid, self.dir / "munged.pid")  # ours to stop
                return
            time.sleep(0.1)
        raise RuntimeError("munged did not start: check /etc/munge/munge.key and /var/log/munge")

    # ---- stop --------------------------------------------------------------------------------

    def stop(self):
        """Cancel the jobs, wait for them to leave, then stop the daemons this folder started."""
        if self.conf.exists():
            self.run("scancel", "--user", str(os.getuid()), check=False)
            for _ in range(60):
                if not self.run("squeue", "-h", "-t", "RUNNING,COMPLETING,PENDING", check=False).stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.dir / f"{name}.pid"
            if not pid_file.exists():
                continue
            pid = int(pid_file.read_text().split()[0])
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue  # already gone
            if Path(exe).name.startswith(name):  # Debian's binaries are slurmctld-wlm, slurmd-wlm
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.05)
            pid_file.unlink(missing_ok=True)  # the daemons remove their own on exit

    # ---- jobs --------------------------------------------------------------------------------

    def submit(self, *args, cwd):
        out = self.run("sbatch", "--parsable", *args, check=False, cwd=cwd)
        if out.returncode:
            raise RuntimeError(f"sbatch {' '.join(map(str, args))} failed: {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id):
        """scontrol's fields of a job: JobState, Restarts, ExitCode, ..."""
        line = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
             timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit(__doc__)
    cluster = Cluster(sys.argv[2])
    if sys.argv[1] == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
