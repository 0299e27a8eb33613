"""``petl submit`` / ``petl jobs``: the Ray Jobs API (``JobSubmissionClient``). A submission ships
the project (``working_dir`` for ``jobs/``, ``py_modules`` for the ``petl_platform`` package, since
``platform/`` is a source root, not a package) and runs ``python -m jobs.finetune|sweep`` there."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from ..errors import PetlError
from ..tracking.settings import check_no_secrets, forwarded_env, petl_home
from .connect import ray_session

NO_AGENT_YET = "No available agent to submit job"  # Ray's answer before the head's job agent is up
ENTRYPOINTS = {"train": "jobs.finetune", "sweep": "jobs.sweep"}
EXCLUDES = [".venv/", ".git/", ".cache/", ".petl/", "mlruns/", "bench/results/", "__pycache__/", "*.egg-info/",
            ".pytest_cache/"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def project_root() -> Path:
    import petl_platform

    root = Path(petl_platform.__file__).resolve().parents[2]
    if not all((root / f"{m.replace('.', '/')}.py").exists() for m in ENTRYPOINTS.values()):
        raise PetlError(f"`petl submit` ships a checkout of the project, but {root} has no jobs/ folder; "
                        "run it from an editable install (pip install -e .)")
    return root


def runtime_env(env: dict[str, str]) -> dict:
    root = project_root()
    return {"working_dir": str(root), "py_modules": [str(root / "platform" / "petl_platform")],
            "excludes": EXCLUDES, "env_vars": env}


def connect(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from .auth import auth_error, prepare_dashboard

    prepare_dashboard(address)  # a token-auth cluster: send the token, or say where to put it
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise auth_error(address) from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PetlError(f"cannot reach the Ray Jobs API at {address}: {first[:200]}") from None


def jobs_address(address: str | None) -> str:
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


def follow(client, job_id: str, out=None) -> str:
    """Stream the job's logs until it ends (to ``out``, default the current ``sys.stdout``);
    returns its final status."""
    out = out or sys.stdout
    async def tail():
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return str(client.get_job_status(job_id))


def submit(kind: str, args: list[str], address: str | None = None, env: dict[str, str] | None = None,
           wait: bool = True, out=None) -> dict:
    """Submit ``petl <kind> <args>`` as a Ray job; without ``address`` start a local cluster (with
    its dashboard on 127.0.0.1) for the duration. Returns ``{"job_id", "status", "address"}``."""
    if kind not in ENTRYPOINTS:
        raise PetlError(f"petl submit runs train or sweep, not {kind!r}")
    check_no_secrets(env or {})
    out = out or sys.stdout  # the current one, not the one at import time
    local = address is None
    with ray_session(None) if local else nullcontext() as ctx:
        if local:
            address = f"http://{ctx.dashboard_url}"
            python = sys.executable  # the same interpreter: one machine
            # Settings only; the cluster just started inherited this process's credentials.
            job_env = {**forwarded_env(), "PETL_HOME": str(petl_home()), **(env or {})}
        else:
            python = "python"  # the cluster's interpreter (the image installs the project's deps)
            job_env = dict(env or {})
        client = connect(address)
        entrypoint = shlex.join([python, "-m", ENTRYPOINTS[kind], *args])
        job_id = None
        # A just-started dashboard may need a moment before it takes jobs: retried for the local
        # cluster, and on any cluster while the head's job agent is not up yet (Ray answers 500 "No
        # available agent to submit job, please try again later"). Anything else fails at once.
        for attempt in range(15):
            try:
                job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(job_env),
                                           submission_id=f"petl-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                           metadata={"petl.kind": kind})
                break
            except RuntimeError as e:
                if attempt == 14 or not (local or NO_AGENT_YET in str(e)):
                    raise PetlError(f"job submission to {address} failed: {str(e).splitlines()[0][:300]}") from None
                time.sleep(2)
        out.write(f"submitted {job_id} to {address}\n  {entrypoint}\n")
        status = "PENDING"
        if wait or local:  # a local cluster lives only as long as this command: always follow
            status = follow(client, job_id, out)
            if status != "SUCCEEDED":
                info = client.get_job_info(job_id)
                try:
                    logs = client.get_job_logs(job_id)
                except Exception:  # noqa: BLE001 - the logs only sharpen the message
                    logs = ""
                raise PetlError(job_failure_message(job_id, status, info.message, logs))
        return {"job_id": job_id, "status": status, "address": address}


CLUSTER_NEEDS = ("A job runs on the cluster's own Python, so every node needs the project's dependencies: run "
                 "the cluster from the project's image (infra/docker/Dockerfile), or start it from the project's "
                 "venv (`.venv/bin/ray start --head`, and `.venv/bin/ray start --address HEAD:6379` on each "
                 "worker); or have Ray install them for each job with a runtime_env `pip` list (the "
                 "dependencies in pyproject.toml)")
_NO_MODULE = re.compile(r"No module named '([^']+)'")
_NO_NAME = re.compile(r"cannot import name '([^']+)' from '([^']+)'")


def job_failure_message(job_id: str, status: str, message: str | None, logs: str | None = "") -> str:
    """One line for a job that did not succeed. A missing module on the cluster (``ModuleNotFoundError``,
    or an ``ImportError`` of a name: another version) in the end of the job's message or logs says
    which module and what the cluster needs; otherwise the message's last line."""
    tail = [ln for text in (message, logs) for ln in (text or "").strip().splitlines()[-30:]]
    for line in reversed(tail):
        found = _NO_MODULE.search(line)
        if found:
            module = found.group(1)
            if module.split(".")[0] in ("petl_platform", "jobs"):
                return (f"job {job_id} {status}: the project's own code did not reach the job (No module named "
                        f"{module!r}): its runtime_env ships jobs/ (working_dir) and petl_platform (py_modules); "
                        "submit from a checkout with an editable install (pip install -e .)")
            return (f"job {job_id} {status}: the cluster's Python has no module {module!r} (ModuleNotFoundError). "
                    f"{CLUSTER_NEEDS}.")
        found = _NO_NAME.search(line)
        if found:
            return (f"job {job_id} {status}: the cluster's {found.group(2)!r} has no {found.group(1)!r} (ImportError): "
                    f"another version than the project's. {CLUSTER_NEEDS}, at the versions of constraints.txt.")
    last = (message or "").strip().splitlines()
    return f"job {job_id} {status}: {last[-1][:300] if last else 'see its logs'}"


def list_jobs(address: str | None) -> list[dict]:
    client = connect(jobs_address(address))
    return [{"job_id": j.submission_id or j.job_id, "status": str(j.status), "entrypoint": j.entrypoint,
             "start_time": j.start_time, "end_time": j.end_time, "message": j.message}
            for j in sorted(client.list_jobs(), key=lambda j: j.start_time or 0)]


def job_logs(address: str | None, job_id: str, follow_logs: bool = False) -> str:
    client = connect(jobs_address(address))
    try:
        if follow_logs:
            return follow(client, job_id)
        return client.get_job_logs(job_id)
    except RuntimeError as e:
        raise PetlError(f"job {job_id!r}: {str(e).splitlines()[0][:200]}") from None


def stop_job(address: str | None, job_id: str) -> bool:
    client = connect(jobs_address(address))
    try:
        return client.stop_job(job_id)
    except RuntimeError as e:
        raise PetlError(f"job {job_id!r}: {str(e).splitlines()[0][:200]}") from None
