"""A sweep as a Ray Job: the driver runs on the cluster (``recipe-search submit -- sweep ...``).

The job's entrypoint is this project's CLI, shipped in the job's runtime environment (``py_modules``,
as ``search.sweep.init_ray`` ships it to workers). A job runs in a temporary working directory that the
cluster deletes afterwards, so nothing the sweep keeps may be relative to it: the storage, the tracking
store and input files must be absolute shared paths or URIs, checked here before anything is submitted.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from typing import Any, Optional

from spaces import SweepError

from search.storage import is_uri

__all__ = ["JOB_COMMANDS", "job_argv", "submit"]

# The CLI commands that run a driver, and so may run as a job.
JOB_COMMANDS = ("sweep", "train", "resume", "confirm", "study")
STOP_WAIT_S = 120  # `ray job stop`: how long the driver has to stop as on Ctrl-C before it is killed (Ray's default: 3 s)
_RELATIVE_HELP = "a Ray Job runs in a temporary working directory that the cluster deletes afterwards"


def _absolute(flag: str, value: str, what: str) -> None:
    if not (is_uri(value) or os.path.isabs(os.path.expanduser(value))):
        raise SweepError(f"{flag} {value!r} is relative, and {_RELATIVE_HELP}: give {what}")


def _check_tracking(uri: Optional[str]) -> None:
    if uri is None:
        raise SweepError(
            f"--tracking-uri is needed: the default (sqlite:///mlflow.db) is relative, and {_RELATIVE_HELP}; give an MLflow server "
            "(http://HOST:5000), a database URL (postgresql://...), or sqlite:////ABSOLUTE/PATH/mlflow.db on storage that outlives the job"
        )
    for prefix in ("sqlite:///", "file://"):
        if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
            raise SweepError(f"--tracking-uri {uri!r} is relative, and {_RELATIVE_HELP}: give {prefix}/ABSOLUTE/PATH, a server or a database URL")
    if "://" not in uri and not os.path.isabs(uri):
        raise SweepError(f"--tracking-uri {uri!r} is relative, and {_RELATIVE_HELP}: give an absolute path, a server or a database URL")


def job_argv(command: str, params: dict[str, Any], argv: list[str]) -> list[str]:
    """The CLI arguments the job runs, checked: what would be relative to the job's working directory is
    refused with a one-line error (``SweepError``); a space or recipe file given by a relative path that
    exists here is passed as an absolute path (it must be where the head node reads it: shared storage)."""
    if command not in JOB_COMMANDS:
        raise SweepError(f"'{command}' does not run a driver: submit one of {', '.join(JOB_COMMANDS)}")
    storage = params.get("storage")
    if command in ("resume", "confirm") and not (is_uri(params["sweep_name"]) or os.path.isabs(params["sweep_name"])):
        if not (is_uri(storage) or os.path.isabs(os.path.expanduser(storage))):
            raise SweepError(f"--storage {storage!r} is relative, and {_RELATIVE_HELP}: give the absolute shared path or the URI the sweep is on")
    elif storage is not None:
        _absolute("--storage", storage, "an absolute path on storage every node reaches, or a URI (s3://BUCKET/PATH, gs://...)")
    if params.get("data") and params["data"] not in ("digits", "digits-det"):
        _absolute("--data", params["data"], "an absolute path every node reads (shared storage)")
    optuna = params.get("optuna_storage") or ""
    if optuna.startswith("sqlite:///") and not optuna[len("sqlite:///"):].startswith("/"):
        raise SweepError(f"--optuna-storage {optuna!r} is relative, and {_RELATIVE_HELP}: give sqlite:////ABSOLUTE/PATH or a database URL")
    if command not in ("resume", "confirm"):
        _check_tracking(params.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"))
    argv = list(argv)
    if command not in ("resume", "confirm") and not params.get("tracking_uri"):
        argv += ["--tracking-uri", os.environ["MLFLOW_TRACKING_URI"]]  # this shell's, which the job would not see
    for name in ("space", "recipe"):
        value = params.get(name)
        if isinstance(value, str) and os.path.isfile(value) and not os.path.isabs(value):
            argv = [os.path.abspath(a) if a == value else a for a in argv]
    return [command, *argv]


_TOKEN_HELP = ("set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH, or "
               "~/.ray/auth_token); 'ray get-auth-token' on the head prints it")


def _client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise SweepError(f"the Ray cluster at {address!r} uses token authentication and refused this client: {_TOKEN_HELP}") from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SweepError(f"the Ray dashboard at {address!r} did not answer as a job server: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def submit(address: str, argv: list[str], wait: bool, out=None) -> int:
    """Submit ``recipe-search ARGV`` as a Ray Job to the cluster whose dashboard is ``address``; with ``wait``,
    print its output as it comes (Ctrl-C detaches, the job goes on) and return the driver's exit code."""
    from ray.exceptions import AuthenticationError

    import search
    import spaces
    import trainables

    out = out or sys.stdout
    client = _client(address)
    modules = [os.path.dirname(m.__file__) for m in (spaces, trainables, search)]
    try:
        job_id = client.submit_job(
            entrypoint="python -m search.cli " + shlex.join(argv),
            runtime_env={"py_modules": modules, "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S), "PYTHONUNBUFFERED": "1"}},
            metadata={"recipe-search": argv[0]},
        )
    except AuthenticationError:
        raise SweepError(f"the Ray cluster at {address!r} uses token authentication and refused this client: {_TOKEN_HELP}") from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SweepError(f"the Ray cluster at {address!r} refused the job: {_first_line(err)}") from None
    print(f"submitted job {job_id} to {address}: recipe-search {shlex.join(argv)}", file=out)
    print(f"  follow: ray job logs -f {job_id} --address {address}; stop (as Ctrl-C): ray job stop {job_id} --address {address}", file=out, flush=True)
    if not wait:
        return 0
    return _follow(client, job_id, address, out)


def _follow(client, job_id: str, address: str, out) -> int:
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
        info = client.get_job_info(job_id)
    except KeyboardInterrupt:
        print(f"\ndetached: job {job_id} goes on (ray job logs -f {job_id} --address {address})", file=out, flush=True)
        return 0
    except Exception as err:  # noqa: BLE001 - the dashboard went away (head restarted, network): the job may go on
        raise SweepError(f"lost the output of job {job_id} ({_first_line(err)}); it may still run: ray job status {job_id} --address {address}") from None
    if info.status == JobStatus.SUCCEEDED:
        return 0
    code = info.driver_exit_code
    print(f"job {job_id} {info.status.value.lower()}" + (f" (exit {code})" if code is not None else "") + (f": {info.message}" if info.message and code is None else ""), file=out)
    return code if isinstance(code, int) and code > 0 else (130 if info.status == JobStatus.STOPPED else 1)
