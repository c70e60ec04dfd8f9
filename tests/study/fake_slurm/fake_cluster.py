"""A fake SLURM for the tests: `sbatch`, `squeue`, `sacct`, `scontrol`, `srun` and `scancel` that run
jobs as local processes. Standard library only; the `fake_slurm` fixture (tests/study/conftest.py)
writes one small executable per tool that calls `main(tool, argv)` and puts them on PATH.

What it imitates, from what submitit 1.5.4 calls and reads:
- `sbatch FILE` (submitit's SlurmExecutor; `--parsable` too): options from the command line and
  the file's `#SBATCH` lines; prints "Submitted batch job N". An `--array=0-K%P` gives elements
  N_0..N_K, at most P running at once. The script is copied at submission, as sbatch does, and runs
  with the submitter's environment (`--export=ALL`), SLURM's variables added, in `--chdir` or
  the submit directory. Every element is followed by a controller process (`_control`), which
  starts it, delivers the `--signal` (USR2@delay) to its tasks `delay` seconds before the time
  limit, kills it at the limit (SIGTERM, SIGKILL after the kill wait) and requeues it when asked.
- `srun [options] CMD`: SLURM_NTASKS tasks of CMD with SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID,
  output to `--output` / `--error` with %A %a %j %t expanded; it forwards the signals it gets to
  its tasks and registers them with the controller.
- `sacct -o JobID,State,NodeList --parsable2 -j ID...` (submitit's InfoWatcher).
- `squeue` with `--noheader`, `--array`, `--user`, `--name`, `--jobs`, `--format` (%i %j %T %A %a).
- `scontrol requeue ID` (submitit's SlurmJobEnvironment._requeue): a running job is ended (as by
  the kill at a time limit) and started again, SLURM_RESTART_COUNT one higher;
  `scontrol update JobId=ID TimeLimit=T` moves its time limit.
- `scancel ID` (cancel) and `scancel ID --signal SIG` (signal its tasks: submitit's `_interrupt`).
Simulated preemption (no SLURM command does it): `preempt(state_dir, job)` sends SIGTERM and the
job's signal to its tasks (SLURM with PreemptParameters=send_user_signal), kills it after the grace
time and requeues it (PreemptMode=REQUEUE).

Environment: FAKE_SLURM_DIR (the job table and logs), FAKE_SLURM_SECONDS_PER_MINUTE (what a minute of
--time lasts; the signal delay is scaled the same way), FAKE_SLURM_KILL_WAIT and FAKE_SLURM_GRACE
(seconds), FAKE_SLURM_HOLD=1 (submitted jobs stay pending until `release`), FAKE_SLURM_LIFETIME
(seconds, default 900: a controller whose test was killed before its teardown cancels its job and
exits then), FAKE_SLURM_REQUEUE_LINGER (seconds `scontrol requeue` takes to exit after
SLURM took the requeue). Everything runs on this host: every node of a multi-node job is `localhost`.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

TOOLS = ("sbatch", "squeue", "sacct", "scontrol", "srun", "scancel")
ACTIVE = ("PENDING", "RUNNING", "REQUEUED")
POLL_S = 0.05
FIRST_ID = 4000


def _state_dir() -> Path:
    return Path(os.environ["FAKE_SLURM_DIR"])


def _setting(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


# --- the job table -------------------------------------------------------------------------------


@contextmanager
def table(state_dir: Path, write: bool = True):
    """The job table, locked for the block (every tool and controller reads and writes it)."""
    with open(state_dir / "table.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = state_dir / "table.json"
        data = json.loads(path.read_text()) if path.exists() else {"next_id": FIRST_ID, "jobs": {}}
        yield data
        if write:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)


def jobs(state_dir: Path) -> dict[str, dict]:
    with table(state_dir, write=False) as data:
        return data["jobs"]


def calls(state_dir: Path) -> list[list[str]]:
    """Every tool call so far, as [tool, *argv]."""
    path = state_dir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _select(data: dict, ident: str) -> list[dict]:
    """The elements an id names: N_i, or N (a plain job, or every element of array N)."""
    ident = ident.strip()
    return [job for key, job in data["jobs"].items()
            if key == ident or (job["array_id"] is not None and str(job["array_id"]) == ident)]


# --- test controls -------------------------------------------------------------------------------


def preempt(state_dir: Path, key: str) -> None:
    with table(state_dir) as data:
        data["jobs"][key]["preempt_at"] = time.time()


def end_time_limit_in(state_dir: Path, key: str, seconds: float) -> None:
    """Set the job's time limit (as `scontrol update TimeLimit=`) to end `seconds` from now."""
    with table(state_dir) as data:
        job = data["jobs"][key]
        job["deadline"] = time.time() + seconds


def release(state_dir: Path) -> None:
    with table(state_dir) as data:
        for job in data["jobs"].values():
            job["hold"] = False


def shut_down(state_dir: Path) -> None:
    """Kill every job and controller (the fixture's teardown)."""
    if not (state_dir / "table.json").exists():
        return
    with table(state_dir) as data:
        for job in data["jobs"].values():
            job["cancel"] = True
            for pid in [job.get("controller"), job.get("batch_pid")]:
                if pid:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            if job["state"] in ACTIVE:
                job["state"] = "CANCELLED"


# --- sbatch --------------------------------------------------------------------------------------


def _parse_options(args: list[str], short: dict[str, str], flags: frozenset = frozenset()) -> tuple[dict, list[str]]:
    """`--key=value`, `--key value`, `--flag` (in `flags`) and short options (in `short`) up to the
    first positional argument; returns (options with dashes as underscores, the rest)."""
    options: dict[str, str | bool] = {}
    flags = flags | {"parsable", "hold", "noheader", "unbuffered", "me", "parsable2", "exclusive"}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if eq:
                options[key] = value
            elif key in flags or i + 1 >= len(args) or args[i + 1].startswith("-"):
                options[key] = True
            else:
                options[key] = args[i + 1]
                i += 1
        elif arg.startswith("-") and len(arg) >= 2 and arg[1] in short:
            key = short[arg[1]]
            if key in flags:
                options[key] = True
            elif len(arg) > 2:
                options[key] = arg[2:]
            else:
                options[key] = args[i + 1]
                i += 1
        else:
            break
        i += 1
    return options, args[i:]


def _minutes(text: str) -> float:
    """SLURM time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, rest = text.rpartition("-") if "-" in text else ("", "", text)
    parts = [int(p) for p in rest.split(":")]
    if days:
        parts = (parts + [0, 0])[:3]
        return int(days) * 1440 + parts[0] * 60 + parts[1] + parts[2] / 60
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0] + parts[1] / 60
    return parts[0] * 60 + parts[1] + parts[2] / 60


def sbatch(argv: list[str]) -> int:
    state_dir = _state_dir()
    options, rest = _parse_options(argv, {"J": "job_name", "N": "nodes", "t": "time", "D": "chdir", "a": "array",
                                          "H": "hold", "o": "output", "e": "error", "p": "partition", "c": "cpus_per_task"})
    script = Path(rest[0])
    in_file: dict[str, str | bool] = {}
    for line in script.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            found, _ = _parse_options(line.split(None, 1)[1].split(), {})
            in_file.update(found)
        elif line.strip() and not line.startswith("#"):
            break
    options = {**in_file, **options}  # the command line wins, as with sbatch
    indices, parallel = [None], 1
    if options.get("array"):
        spec, _, limit = str(options["array"]).partition("%")
        low, _, high = spec.partition("-")
        indices = list(range(int(low), int(high or low) + 1))
        parallel = int(limit) if limit else len(indices)
    signal_name, delay = "USR2", 0.0
    if options.get("signal"):
        sig, _, at = str(options["signal"]).removeprefix("B:").partition("@")
        signal_name, delay = sig.removeprefix("SIG"), float(at or 60)
    scale = _setting("FAKE_SLURM_SECONDS_PER_MINUTE", 60) / 60
    nodes = int(options.get("nodes", 1))
    per_node = int(options.get("ntasks_per_node", 1))
    with table(state_dir) as data:
        first = data["next_id"]
        data["next_id"] += len(indices)
        keys = []
        (state_dir / "scripts").mkdir(exist_ok=True)
        kept = state_dir / "scripts" / f"{first}.sh"
        shutil.copy(script, kept)
        for n, index in enumerate(indices):
            key = str(first) if index is None else f"{first}_{index}"
            keys.append(key)
            data["jobs"][key] = {
                "key": key, "job_id": first + n, "array_id": first if index is not None else None,
                "array_index": index, "parallel": parallel, "name": str(options.get("job_name", script.name)),
                "script": str(kept), "options": {k: v for k, v in options.items()},
                "env": dict(os.environ), "cwd": str(options.get("chdir") or os.getcwd()),
                "submit_dir": os.getcwd(), "user": getpass.getuser(),
                "time_s": _minutes(str(options.get("time", "5"))) * 60 * scale,
                "signal": signal_name, "signal_delay_s": delay * scale,
                "nodes": nodes, "ntasks_per_node": per_node, "cpus_per_task": options.get("cpus_per_task"),
                "hold": bool(options.get("hold")) or os.environ.get("FAKE_SLURM_HOLD") == "1",
                "state": "PENDING", "attempts": 0, "exit_code": None, "history": [],
                "cancel": False, "requeue": False, "preempt_at": None, "steps": {},
            }
    for key in keys:
        controller = subprocess.Popen([sys.executable, __file__, "_control", str(state_dir), key],
                                      start_new_session=True, stdin=subprocess.DEVNULL,
                                      stdout=open(state_dir / f"control-{key}.log", "ab"), stderr=subprocess.STDOUT)
        with table(state_dir) as data:
            data["jobs"][key]["controller"] = controller.pid
    print(first if options.get("parsable") else f"Submitted batch job {first}", flush=True)
    return 0


# --- a job's controller ----------------------------------------------------------------------------


def _expand(pattern: str, job: dict, task: int = 0) -> str:
    array_id = job["array_id"] if job["array_id"] is not None else job["job_id"]
    index = job["array_index"] if job["array_index"] is not None else 4294967294
    return (pattern.replace("%%", "\0").replace("%A", str(array_id)).replace("%a", str(index))
            .replace("%j", str(job["job_id"])).replace("%t", str(task)).replace("%x", job["name"]).replace("\0", "%"))


def _signal_tasks(job: dict, signum: int) -> bool:
    """Send `signum` to every task of the job's steps; False when it has none yet."""
    sent = False
    for pids in job["steps"].values():
        for pid in pids:
            try:
                os.kill(pid, signum)
                sent = True
            except ProcessLookupError:
                pass
    return sent


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _end(batch: subprocess.Popen) -> None:
    """End a job as SLURM does: SIGTERM to all of it, SIGKILL after the kill wait."""
    try:
        os.killpg(batch.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + _setting("FAKE_SLURM_KILL_WAIT", 2)
    while time.time() < deadline:
        batch.poll()
        if not _group_alive(batch.pid):
            return
        time.sleep(POLL_S)
    try:
        os.killpg(batch.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    batch.wait()


def _expired() -> bool:
    return time.time() - _BORN > _setting("FAKE_SLURM_LIFETIME", 900)


_BORN = time.time()


def _start(state_dir: Path, key: str) -> subprocess.Popen | None:
    """Wait while the element is pending; start its batch script (None: cancelled meanwhile)."""
    while True:
        with table(state_dir) as data:
            job = data["jobs"][key]
            if job["cancel"] or _expired():
                job["state"] = "CANCELLED"
                return None
            running = sum(1 for other in data["jobs"].values()
                          if other["array_id"] is not None and other["array_id"] == job["array_id"]
                          and other["state"] == "RUNNING")
            if not job["hold"] and running < job["parallel"]:
                now = time.time()
                job.update(state="RUNNING", start=now, deadline=now + job["time_s"], signalled=False, requeue=False,
                           preempt_at=None, preempt_signalled=False, steps={})
                job["attempts"] += 1
                break
        time.sleep(POLL_S)
    ntasks = job["nodes"] * job["ntasks_per_node"]
    env = dict(job["env"])
    env.update({
        "SLURM_JOB_ID": str(job["job_id"]), "SLURM_JOBID": str(job["job_id"]), "SLURM_JOB_NAME": job["name"],
        "SLURM_JOB_NUM_NODES": str(job["nodes"]), "SLURM_NNODES": str(job["nodes"]),
        "SLURM_JOB_NODELIST": ",".join(["localhost"] * job["nodes"]), "SLURMD_NODENAME": "localhost",
        "SLURM_NTASKS": str(ntasks), "SLURM_NTASKS_PER_NODE": str(job["ntasks_per_node"]),
        "SLURM_SUBMIT_DIR": job["submit_dir"], "SLURM_RESTART_COUNT": str(job["attempts"] - 1),
        "FAKE_SLURM_JOB_KEY": key, "FAKE_SLURM_DIR": str(state_dir),
    })
    if job["cpus_per_task"]:
        env["SLURM_CPUS_PER_TASK"] = str(job["cpus_per_task"])
    if job["array_id"] is not None:
        env.update(SLURM_ARRAY_JOB_ID=str(job["array_id"]), SLURM_ARRAY_TASK_ID=str(job["array_index"]))
    output = _expand(str(job["options"].get("output", "slurm-%j.out")), job)
    error = _expand(str(job["options"].get("error", output)), job)
    for path in (output, error):
        Path(job["cwd"], path).parent.mkdir(parents=True, exist_ok=True)
    batch = subprocess.Popen(["bash", job["script"]], cwd=job["cwd"], env=env, start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=open(Path(job["cwd"], output), "ab"),
                             stderr=open(Path(job["cwd"], error), "ab"))
    with table(state_dir) as data:
        data["jobs"][key]["batch_pid"] = batch.pid
    return batch


def _follow(state_dir: Path, key: str, batch: subprocess.Popen) -> str:
    """Run one attempt to its end; returns the final state, or "requeue"."""
    while True:
        code = batch.poll()
        with table(state_dir) as data:
            job = data["jobs"][key]
            now = time.time()
            if code is not None:
                job["exit_code"] = code
                if job["requeue"] or job["preempt_at"] is not None:
                    return "requeue"
                return "COMPLETED" if code == 0 else "FAILED"
            action = None
            if job["cancel"] or _expired():
                action = "CANCELLED"
            elif job["requeue"]:
                action = "requeue"  # scontrol requeue of a running job ends it now
            elif job["preempt_at"] is not None:
                if not job["preempt_signalled"]:
                    _signal_tasks(job, signal.SIGTERM)
                    job["preempt_signalled"] = _signal_tasks(job, getattr(signal, "SIG" + job["signal"]))
                if now >= job["preempt_at"] + _setting("FAKE_SLURM_GRACE", 10):
                    action = "requeue"
            else:
                if not job["signalled"] and job["signal_delay_s"] and now >= job["deadline"] - job["signal_delay_s"]:
                    job["signalled"] = _signal_tasks(job, getattr(signal, "SIG" + job["signal"]))
                if now >= job["deadline"]:
                    action = "TIMEOUT"
        if action is not None:
            _end(batch)
            with table(state_dir, write=False) as data:
                requeued = data["jobs"][key]["requeue"]  # the job may have asked while it was ended
            return "requeue" if requeued and action != "CANCELLED" else action
        time.sleep(POLL_S)


def control(state_dir: Path, key: str) -> int:
    while True:
        batch = _start(state_dir, key)
        if batch is None:
            return 0
        result = _follow(state_dir, key, batch)
        with table(state_dir) as data:
            job = data["jobs"][key]
            job["history"].append({"attempt": job["attempts"], "ended": result, "exit_code": job["exit_code"],
                                   "start": job["start"], "end": time.time()})
            job["steps"] = {}
            if result != "requeue":
                job["state"] = result
                return 0
            job.update(state="PENDING", requeue=False, preempt_at=None)


# --- srun ------------------------------------------------------------------------------------------


def srun(argv: list[str]) -> int:
    options, command = _parse_options(argv, {"o": "output", "e": "error", "n": "ntasks", "c": "cpus_per_task"})
    state_dir = _state_dir()
    key = os.environ["FAKE_SLURM_JOB_KEY"]
    with table(state_dir, write=False) as data:
        job = data["jobs"][key]
    ntasks = int(options.get("ntasks", os.environ["SLURM_NTASKS"]))
    per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", ntasks))
    tasks = []
    for task in range(ntasks):
        env = dict(os.environ, SLURM_PROCID=str(task), SLURM_LOCALID=str(task % per_node),
                   SLURM_NODEID=str(task // per_node), SLURM_STEP_ID="0", SLURM_STEPID="0")
        if options.get("cpus_per_task"):
            env["SLURM_CPUS_PER_TASK"] = str(options["cpus_per_task"])
        output = Path(_expand(str(options.get("output", "slurm-%j.out")), job, task))
        error = Path(_expand(str(options.get("error", output)), job, task))
        output.parent.mkdir(parents=True, exist_ok=True)
        tasks.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=open(output, "ab"),
                                      stderr=open(error, "ab")))
    with table(state_dir) as data:
        data["jobs"][key]["steps"][str(os.getpid())] = [task.pid for task in tasks]

    def forward(signum, frame):
        for task in tasks:
            if task.poll() is None:
                task.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT):
        signal.signal(signum, forward)
    codes = [task.wait() for task in tasks]
    return next((code for code in codes if code), 0) & 0xFF


# --- queries and control ------------------------------------------------------------------------


def sacct(argv: list[str]) -> int:
    fields, ids = ["JobID", "State"], []
    args = iter(argv)
    for arg in args:
        if arg in ("-o", "--format"):
            fields = next(args).split(",")
        elif arg.startswith("--format="):
            fields = arg.split("=", 1)[1].split(",")
        elif arg in ("-j", "--jobs"):
            ids += next(args).split(",")
        elif arg.startswith("--jobs="):
            ids += arg.split("=", 1)[1].split(",")
    print("|".join(fields))
    with table(_state_dir(), write=False) as data:
        for ident in ids:
            for job in _select(data, ident):
                values = {"JobID": job["key"], "State": job["state"], "JobName": job["name"],
                          "NodeList": "localhost" if job["state"] != "PENDING" else "None assigned",
                          "ExitCode": f"{job['exit_code'] or 0}:0"}
                print("|".join(str(values.get(field, "")) for field in fields))
    return 0


def _format(fmt: str, values: dict) -> str:
    """squeue's --format: %i, %.18i ... replaced by the field's value."""
    return re.sub(r"%[.\d]*([a-zA-Z])", lambda match: str(values.get(match.group(1), "")), fmt)


def squeue(argv: list[str]) -> int:
    options, _ = _parse_options(argv, {"h": "noheader", "r": "array", "u": "user", "n": "name", "j": "jobs",
                                       "o": "format", "t": "states"}, frozenset({"array"}))
    fmt = str(options.get("format", "%i %j %T"))
    names = set(str(options["name"]).split(",")) if options.get("name") else None
    wanted = str(options["jobs"]).split(",") if options.get("jobs") else None
    user = getpass.getuser() if options.get("me") else options.get("user")
    rows = []
    with table(_state_dir(), write=False) as data:
        selected = [job for ident in wanted for job in _select(data, ident)] if wanted else data["jobs"].values()
        for job in selected:
            if job["state"] not in ACTIVE or (names and job["name"] not in names) or (user and job["user"] != user):
                continue
            values = {"i": job["key"], "j": job["name"], "T": job["state"], "u": job["user"],
                      "A": job["array_id"] or job["job_id"], "a": job["array_index"] if job["array_index"] is not None else "N/A"}
            rows.append(_format(fmt, values))
    if not options.get("noheader"):
        print(_format(fmt, {"i": "JOBID", "j": "NAME", "T": "STATE", "u": "USER", "A": "ARRAY_JOB_ID", "a": "ARRAY_TASK_ID"}))
    for row in rows:
        print(row)
    return 0


def scontrol(argv: list[str]) -> int:
    if argv[:1] == ["requeue"]:
        with table(_state_dir()) as data:
            for ident in argv[1].split(","):
                selected = [job for job in _select(data, ident) if job["state"] in ACTIVE]
                if not selected:
                    print(f"Requeue of job {ident} failed: Invalid job id specified", file=sys.stderr)
                    return 1
                for job in selected:
                    job["requeue"] = True
        # SLURM ends a running job as soon as it accepted the requeue; a scontrol run from inside
        # the job that has not exited by then is killed with it (FAKE_SLURM_REQUEUE_LINGER widens
        # that window to make it certain).
        time.sleep(_setting("FAKE_SLURM_REQUEUE_LINGER", 0))
        return 0
    if argv[:1] == ["update"]:
        fields = dict(arg.split("=", 1) for arg in argv[1:])
        fields = {k.lower(): v for k, v in fields.items()}
        scale = _setting("FAKE_SLURM_SECONDS_PER_MINUTE", 60) / 60
        with table(_state_dir()) as data:
            for job in _select(data, fields["jobid"]):
                if "timelimit" in fields:
                    job["time_s"] = _minutes(fields["timelimit"]) * 60 * scale
                    if job["state"] == "RUNNING":
                        job["deadline"] = job["start"] + job["time_s"]
        return 0
    if argv[:2] == ["show", "job"]:
        with table(_state_dir(), write=False) as data:
            for job in _select(data, argv[2]):
                print(f"JobId={job['job_id']} JobName={job['name']} JobState={job['state']} "
                      f"Restarts={max(job['attempts'] - 1, 0)}")
        return 0
    print(f"fake scontrol: unsupported {' '.join(argv)}", file=sys.stderr)
    return 1


def scancel(argv: list[str]) -> int:
    sent, ids = None, []
    args = iter(argv)
    for arg in args:  # submitit puts the id first: `scancel ID --signal SIG`
        if arg in ("-s", "--signal"):
            sent = next(args)
        elif arg.startswith("--signal="):
            sent = arg.split("=", 1)[1]
        elif not arg.startswith("-"):
            ids.append(arg)
    with table(_state_dir()) as data:
        for ident in ids:
            for job in _select(data, ident):
                if sent:
                    _signal_tasks(job, getattr(signal, "SIG" + sent.removeprefix("SIG")))
                elif job["state"] in ACTIVE:
                    job["cancel"] = True
    return 0


def main(tool: str, argv: list[str]) -> int:
    state_dir = _state_dir()
    with open(state_dir / "calls.jsonl", "a") as log:
        log.write(json.dumps([tool, *argv]) + "\n")
    return {"sbatch": sbatch, "squeue": squeue, "sacct": sacct, "scontrol": scontrol, "srun": srun,
            "scancel": scancel}[tool](argv)


if __name__ == "__main__":
    if sys.argv[1] == "_control":
        sys.exit(control(Path(sys.argv[2]), sys.argv[3]))
    sys.exit(main(sys.argv[1], sys.argv[2:]))
