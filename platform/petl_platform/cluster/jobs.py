"""``petl submit`` / ``petl jobs``: the Ray Jobs API (``JobSubmissionClient``). A submission ships
the project (``working_dir`` for ``jobs/``, ``py_modules`` for the ``petl_platform`` package, since
``platform/`` is a source root, not a package) and runs ``python -m jobs.finetune|sweep`` there."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from ..errors import PetlError
from ..tracking.settings import check_no_secrets, forwarded_env, petl_home
from .connect import ray_session

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


def follow(client, job_id: str, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    async def tail():
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return str(client.get_job_status(job_id))


def submit(kind: str, args: list[str], address: str | None = None, env: dict[str, str] | None = None,
           wait: bool = True, out=sys.stdout) -> dict:
    """Submit ``petl <kind> <args>`` as a Ray job; without ``address`` start a local cluster (with
    its dashboard on 127.0.0.1) for the duration. Returns ``{"job_id", "status", "address"}``."""
    if kind not in ENTRYPOINTS:
        raise PetlError(f"petl submit runs train or sweep, not {kind!r}")
    check_no_secrets(env or {})
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
        for attempt in range(10):  # a just-started dashboard may need a moment before it takes jobs
            try:
                job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(job_env),
                                           submission_id=f"petl-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                           metadata={"petl.kind": kind})
                break
            except RuntimeError as e:
                if attempt == 9 or not local:
                    raise PetlError(f"job submission to {address} failed: {str(e).splitlines()[0][:300]}") from None
                time.sleep(2)
        out.write(f"submitted {job_id} to {address}\n  {entrypoint}\n")
        status = "PENDING"
        if wait or local:  # a local cluster lives only as long as this command: always follow
            status = follow(client, job_id, out)
            if status != "SUCCEEDED":
                info = client.get_job_info(job_id)
                raise PetlError(f"job {job_id} {status}: {(info.message or '').strip().splitlines()[-1][:300] if info.message else 'see its logs'}")
        return {"job_id": job_id, "status": status, "address": address}


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
