"""Where a sweep keeps its files, and finding and reading them: the bottom layer of ``search``.

Everything here reads; the Tune callbacks (``search.monitor``, ``search.tracking``)
and the launch (``search.sweep``) write. No other module of ``search`` is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Optional

from spaces import SweepError
from trainables.report import CHECKPOINT_FILE

__all__ = [
    "BEST_RECIPE_FILE",
    "CONFIRMATION_FILE",
    "CONFIRM_DIR",
    "LOG_FILE",
    "META_DIR",
    "OPTUNA_FILE",
    "RUNS_FILE",
    "RUN_PREFIX",
    "SPEC_FILE",
    "STATE_FILE",
    "best_checkpoint",
    "check_no_driver",
    "DamagedFile",
    "check_private",
    "disk_full",
    "live_lease",
    "release_lease",
    "set_aside_damaged",
    "renew_lease",
    "take_lease",
    "count_states",
    "driver_gone",
    "find_sweep",
    "pull_sweep",
    "sweep_ref",
    "sweep_storage",
    "read_confirmation",
    "read_run_map",
    "read_state",
    "resolve_run",
    "trial_checkpoint",
    "winner_trial",
    "write_json",
]

# The sweep's own files live in a subfolder: on resume, Tune copies the top-level .json
# files of the experiment folder to its staging folder and syncs them back over and over,
# which would overwrite these with the copies it took at restore time.
META_DIR = "recipe-search"
SPEC_FILE = f"{META_DIR}/sweep.json"  # how the sweep was launched
STATE_FILE = f"{META_DIR}/state.json"  # trial states, last metrics, the best trial
RUNS_FILE = f"{META_DIR}/mlflow_runs.json"  # trial -> MLflow run
OPTUNA_FILE = f"{META_DIR}/optuna.db"  # the searcher's Optuna study (unless --optuna-storage names another)
SCHEDULER_FILE = f"{META_DIR}/asha.pkl"  # ASHA's rungs, which Tune does not restore on resume
# What sweep.json's "format" says: the layout of what Tune pickles for resume (the searcher's
# state). A sweep written with an older format is read by status/best/report, not resumed.
SWEEP_FORMAT = 2
CONFIRM_DIR = "confirm"  # the Tune experiment of a confirmation over seeds (search.confirm)
CONFIRMATION_FILE = f"{META_DIR}/confirmation.json"  # its result: statistics and the confirmed winner
LEASE_FILE = f"{META_DIR}/driver.json"  # the driver running the sweep now: host, pid, heartbeat
LEASE_TIMEOUT_S = 60.0  # a lease whose heartbeat is older is stale (its driver died without a word)
BEST_RECIPE_FILE = "best_recipe.yaml"
LOG_FILE = "ray.log"
RUN_PREFIX = "run:"


def find_sweep(name_or_path: str, storage: str = "runs", for_driver: bool = False) -> str:
    """A sweep's local folder, by path or by name under the storage root. On object storage (``--storage
    s3://...``, or the sweep's own URI) its files are pulled from there first: into a copy of this process's
    own to read it, or (``for_driver``: resume, confirm) into its mirror, unless a driver here runs it."""
    from search.storage import Storage, is_uri, split_uri, storage_of

    if is_uri(name_or_path) or is_uri(storage):
        root, name = (storage, name_or_path) if not is_uri(name_or_path) else split_uri(name_or_path)
        return pull_sweep(Storage.open(root), name, for_driver)
    candidates = [Path(name_or_path), Path(storage).expanduser() / name_or_path]
    for candidate in candidates:
        if (candidate / SPEC_FILE).is_file():
            mirrored = storage_of(str(candidate))  # a mirror's path: its sweep, pulled again
            return pull_sweep(mirrored[0], mirrored[1], for_driver) if mirrored else str(candidate.absolute())
    for candidate in candidates:
        if candidate.is_dir():
            raise SweepError(f"{str(candidate)!r} is not a sweep directory (it has no {SPEC_FILE})")
    raise SweepError(f"no sweep {name_or_path!r}: not a path, and not a name under storage {storage!r}")


def pull_sweep(store, name: str, for_driver: bool) -> str:
    """Sweep ``name`` of remote storage ``store``, pulled (see ``find_sweep``); one-line errors."""
    if not store.is_file(name, SPEC_FILE):
        raise SweepError(f"no sweep {name!r} in storage {store} (no {SPEC_FILE} there)")
    if for_driver and os.path.isdir(store.mirror(name)):
        check_no_driver(store.mirror(name))  # its mirror is that driver's working copy
    return store.pull(name, reading=not for_driver)


# The keys (and their types) without which a file the driver writes cannot be read.
_STATE_KEYS = {"name": str, "trials": dict, "num_samples": int, "metric": str, "mode": str}
_RUN_MAP_KEYS = {"trials": dict}


class DamagedFile(SweepError):
    """A file the driver wrote cannot be read back (truncated, overwritten, not what it should hold)."""


def _damaged(path: str, what: str) -> DamagedFile:
    rebuilt = os.path.basename(path) in (os.path.basename(STATE_FILE), os.path.basename(RUNS_FILE))
    return DamagedFile(
        f"{path} is damaged ({what}): a crash or a full disk can leave it so; "
        + ("'recipe-search resume' rebuilds it from Tune's experiment and MLflow (and keeps it as .damaged)" if rebuilt
           else "restore it from a copy")
    )


def _read_json(sweep_dir: str, name: str, keys: dict[str, type]) -> Optional[dict[str, Any]]:
    """A JSON object the driver wrote, with ``keys`` of their types; None when absent; one-line errors."""
    path = os.path.join(sweep_dir, name)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except IsADirectoryError:
        raise _damaged(path, "a directory, not a file") from None
    except OSError as err:
        raise SweepError(f"{path} cannot be read: {err.strerror}") from None
    except ValueError as err:  # JSON and UTF-8 errors
        raise _damaged(path, f"not JSON: {str(err).splitlines()[0][:80]}") from None
    if not isinstance(data, dict):
        raise _damaged(path, f"a JSON {type(data).__name__}, not an object")
    for key, kind in keys.items():
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise _damaged(path, f"no {kind.__name__} {key!r}")
    return data


def read_state(sweep_dir: str) -> Optional[dict[str, Any]]:
    """The sweep's recorded state (``state.json``), or None before its first trial."""
    state = _read_json(sweep_dir, STATE_FILE, _STATE_KEYS)
    path = os.path.join(sweep_dir, STATE_FILE)
    for trial_id, record in (state or {}).get("trials", {}).items():
        if not isinstance(record, dict) or not isinstance(record.get("status"), str) or not isinstance(record.get("config", {}), dict):
            raise _damaged(path, f"trial {str(trial_id)[:40]!r} has no status or config")
    for key in ("driver", "baseline"):
        if (state or {}).get(key) is not None and not isinstance(state[key], dict):
            raise _damaged(path, f"its {key} is a JSON {type(state[key]).__name__}, not an object")
    best = (state or {}).get("best")
    if best is not None and not (isinstance(best, dict) and isinstance(best.get("recipe"), dict) and isinstance(best.get("value"), (int, float))):
        raise _damaged(path, "its best trial has no recipe or value")
    return state


def read_run_map(sweep_dir: str) -> dict[str, Any]:
    """``{"experiment_id", "parent_run_id", "trials": {trial_id: run_id}, ...}`` of a tracked sweep."""
    runs = _read_json(sweep_dir, RUNS_FILE, _RUN_MAP_KEYS) or {"trials": {}}
    if not all(isinstance(run_id, str) for run_id in runs["trials"].values()):
        raise _damaged(os.path.join(sweep_dir, RUNS_FILE), "a trial's run id is not a string")
    return runs


def write_json(path: str, data: Any) -> None:
    """``data`` as the JSON file ``path``, atomically: readers see the old file or the whole new one.

    Compact, through ``json.dumps`` (its C encoder: ``json.dump`` and any indent take the pure-Python
    one, 4x slower on a 1,000-trial state, which the driver rewrites as a sweep runs).
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = json.dumps(data, default=str)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def set_aside_damaged(sweep_dir: str) -> list[str]:
    """Under a resume's lease: a damaged ``state.json`` or ``mlflow_runs.json`` (of the sweep, and of its
    confirmation) is renamed to ``*.damaged``, for the driver to rebuild (the state from the trials Tune
    restores, the run map from the MLflow runs' tags). The paths set aside."""
    moved = []
    for directory in (sweep_dir, os.path.join(sweep_dir, CONFIRM_DIR)):
        for name, reader in ((STATE_FILE, read_state), (RUNS_FILE, read_run_map)):
            try:
                reader(directory)
            except DamagedFile:
                path = os.path.join(directory, name)
                os.replace(path, path + ".damaged")
                moved.append(path)
    return moved


def read_confirmation(sweep_dir: str) -> Optional[dict[str, Any]]:
    """The result of a sweep's finished confirmation over seeds, or None."""
    summary = _read_json(sweep_dir, CONFIRMATION_FILE, {"recipes": list, "seeds": list})
    if summary is not None and summary.get("winner") is not None:
        if not any(isinstance(r, dict) and r.get("trial_id") == summary["winner"] and isinstance(r.get("recipe"), dict) for r in summary["recipes"]):
            raise _damaged(os.path.join(sweep_dir, CONFIRMATION_FILE), "its winner is not among its recipes")
    return summary


def winner_trial(sweep_dir: str) -> Optional[str]:
    """The trial a finished sweep delivers: the confirmed winner when confirmed, else the search's best."""
    confirmation = read_confirmation(sweep_dir)
    if confirmation is not None and confirmation.get("winner"):
        return confirmation["winner"]
    best = (read_state(sweep_dir) or {}).get("best")
    return best["trial_id"] if best else None


def count_states(state: dict[str, Any]) -> dict[str, int]:
    """Trials by state; those not yet created count as PENDING."""
    counts = {"TERMINATED": 0, "ERROR": 0, "RUNNING": 0, "PENDING": 0}
    for record in state["trials"].values():
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    counts["PENDING"] += max(0, state["num_samples"] - sum(counts.values()))
    return counts


def live_lease(sweep_dir: str) -> Optional[dict[str, Any]]:
    """The lease of a driver that runs the sweep now, or None: none, or stale (on this host: its process
    is gone; on another: its heartbeat is older than ``LEASE_TIMEOUT_S``)."""
    import time

    try:
        with open(os.path.join(sweep_dir, LEASE_FILE)) as f:
            lease = json.load(f)
        host, pid, beat = str(lease["host"]), int(lease["pid"]), float(lease["heartbeat"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: no driver can be proven to hold it
    if host == socket.gethostname():  # its own host: alive while its process is (a paused driver too)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except OSError:
            pass
    elif time.time() - beat > LEASE_TIMEOUT_S:
        return None
    return {**lease, "age_s": time.time() - beat}


def check_no_driver(sweep_dir: str) -> None:
    """Refuse to touch a sweep another driver runs: a second driver would write a stale experiment
    state, relaunch live trials and, on its next resume, drop finished ones."""
    lease = live_lease(sweep_dir)
    if lease is not None and not (lease["host"] == socket.gethostname() and int(lease["pid"]) == os.getpid()):
        raise SweepError(
            f"sweep {os.path.basename(sweep_dir)!r} is being run by another driver (pid {lease['pid']} on {lease['host']}, "
            f"alive {lease['age_s']:.0f} s ago): stop it first (Ctrl-C, or kill {lease['pid']}), then resume"
        )


def _read_lease(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path) as f:
            lease = json.load(f)
        return lease if isinstance(lease, dict) else None
    except (OSError, ValueError):
        return None


TAKEOVER_TIMEOUT_S = 30.0  # a takeover lock older than this was left by a driver that died taking over


def _create_exclusive(source: str, path: str) -> bool:
    """Create ``path`` with ``source``'s content unless it exists, atomically: a hard link (whole content at
    once, also on NFS), or on file systems without hard links an exclusive create. False when it existed."""
    try:
        os.link(source, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some FUSE and SMB mounts)
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f, open(source) as content:
        f.write(content.read())
    return True


def take_lease(sweep_dir: str, lease: dict[str, Any]) -> None:
    """Write ``lease`` as the sweep's driver lease, atomically against other drivers doing the same: it is
    created only where none exists; a stale one is removed only by the driver holding the takeover lock
    (created the same way), which checks, under it, that the lease is still the stale one it judged.
    Raises ``SweepError`` naming the live holder."""
    import time

    path = os.path.join(sweep_dir, LEASE_FILE)
    lock = path + ".takeover"
    mine = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    with open(mine, "w") as f:
        json.dump(lease, f)
    try:
        for _ in range(5):
            if _create_exclusive(mine, path):
                return
            check_no_driver(sweep_dir)  # a live holder: one line naming it
            try:  # a takeover lock left by a driver that died while taking over goes stale too
                if time.time() - os.stat(lock).st_mtime > TAKEOVER_TIMEOUT_S:
                    os.remove(lock)
            except FileNotFoundError:
                pass
            if not _create_exclusive(mine, lock):
                time.sleep(0.2)  # another driver is taking over: see what it made of the lease
                continue
            try:
                if live_lease(sweep_dir) is None:  # still stale (or gone) under the lock: remove it, then create ours
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
            finally:
                os.remove(lock)
        check_no_driver(sweep_dir)
        raise SweepError(f"sweep {os.path.basename(sweep_dir)!r}: other drivers are taking it at the same moment; try again")
    finally:
        with contextlib.suppress(OSError):
            os.remove(mine)


def renew_lease(sweep_dir: str, lease: dict[str, Any]) -> bool:
    """Renew this driver's heartbeat; False (and nothing written) when the lease is no longer its own
    (another driver took it over as stale)."""
    import time

    path = os.path.join(sweep_dir, LEASE_FILE)
    current = _read_lease(path)
    if current is None or any(current.get(k) != lease.get(k) for k in ("host", "pid", "started")):
        return False
    mine = f"{path}.{socket.gethostname()}.{os.getpid()}.beat"
    with open(mine, "w") as f:
        json.dump({**lease, "heartbeat": time.time()}, f)
    os.replace(mine, path)
    return True


def release_lease(sweep_dir: str, lease: dict[str, Any]) -> None:
    """Remove the lease if it is still this driver's."""
    path = os.path.join(sweep_dir, LEASE_FILE)
    current = _read_lease(path)
    if current is not None and all(current.get(k) == lease.get(k) for k in ("host", "pid", "started")):
        with contextlib.suppress(OSError):
            os.remove(path)


DISK_FULL = ("No space left on device", "database or disk is full", "Disk quota exceeded")


def disk_full(err: Optional[BaseException]) -> Optional[str]:
    """What says the disk is full in ``err`` or the exceptions it was raised from (a Tune abort wraps a
    callback's ``OSError``, MLflow wraps SQLite's), as one line; None when nothing does."""
    import errno

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err.strerror + (f" ({err.filename})" if err.filename else "")
        text = str(err)
        for marker in DISK_FULL:
            if marker in text:
                return next(line.strip() for line in text.splitlines() if marker in line)[:200]
        err = err.__cause__ or err.__context__
    return None


def _private_group(gid: int) -> bool:
    """Whether ``gid`` is this user's own group with no other members (the user private groups of Debian,
    Ubuntu and Fedora, whose umask 002 leaves files group-writable): writable by the group is by no one else."""
    import grp
    import pwd

    try:
        user, group = pwd.getpwuid(os.getuid()), grp.getgrgid(gid)
    except KeyError:
        return False
    others = {u.pw_name for u in pwd.getpwall() if u.pw_gid == gid} | set(group.gr_mem)
    return group.gr_name == user.pw_name and gid == user.pw_gid and others <= {user.pw_name}


def check_private(sweep_dir: str) -> None:
    """Refuse to resume from a sweep folder others can change: resume unpickles Tune's ``tuner.pkl``,
    experiment state and searcher, and this project's scheduler, and whoever can write those files runs
    code as the user who resumes. Checked: the folders that hold them, and the files, are this user's
    and writable by no one else."""
    import glob

    folders = [sweep_dir, os.path.join(sweep_dir, META_DIR), os.path.join(sweep_dir, CONFIRM_DIR), os.path.join(sweep_dir, CONFIRM_DIR, META_DIR)]
    paths = []
    for folder in folders:
        if os.path.isdir(folder):
            paths.append(folder)
            for pattern in ("*.pkl", "*-state-*.json", "*_state-*.json"):
                paths.extend(sorted(glob.glob(os.path.join(folder, pattern))))
    for path in paths:
        info = os.stat(path)  # a symlinked sweep folder: its target's owner and mode
        if info.st_uid != os.getuid():
            raise SweepError(
                f"refusing to resume: {path!r} belongs to another user (uid {info.st_uid}); resume unpickles this sweep's "
                "state, which runs code as you: resume it as its owner, or copy the folder you trust and resume the copy"
            )
        if info.st_mode & 0o002 or (info.st_mode & 0o020 and not _private_group(info.st_gid)):
            raise SweepError(
                f"refusing to resume: {path!r} is writable by other users (mode {info.st_mode & 0o777:o}); resume unpickles "
                f"this sweep's state, so whoever can write there can run code as you; if you trust them: chmod -R go-w {sweep_dir!r}"
            )


def driver_gone(state: dict[str, Any]) -> bool:
    """Whether an unfinished sweep's driver is known to have stopped (checked on its own host only)."""
    driver = state.get("driver") or {}
    if state.get("finished") or driver.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(driver["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, ValueError):
        return False
    return False


def sweep_storage(sweep_dir: str):
    """The storage and name of the sweep whose local folder is ``sweep_dir``: its mirror's, or its own path's."""
    from search.storage import Storage, storage_of

    return storage_of(sweep_dir) or (Storage.open(os.path.dirname(os.path.abspath(sweep_dir))), os.path.basename(os.path.abspath(sweep_dir)))


def sweep_ref(sweep_dir: str) -> str:
    """How a command names the sweep whose local folder is ``sweep_dir`` (for the commands it prints): its path,
    or, on object storage, its name and ``--storage`` (the mirror's path means nothing on another machine)."""
    import shlex

    from search.storage import storage_of

    mirrored = storage_of(sweep_dir)
    return f"{mirrored[1]} --storage {shlex.quote(mirrored[0].public)}" if mirrored else sweep_dir


def trial_checkpoint(sweep_dir: str, trial_id: str) -> Optional[str]:
    """The newest checkpoint directory a trial left, in its Tune folder or its Ray Train run's folder,
    on the sweep's storage: a local path, or a URI on object storage."""
    import fnmatch

    import pyarrow.fs

    store, name = sweep_storage(sweep_dir)
    folders = [e.base_name for e in store.listdir(name) if e.type == pyarrow.fs.FileType.Directory and fnmatch.fnmatch(e.base_name, f"*_{trial_id}_*")]
    found = []
    for folder in folders + [f"train/train-{trial_id}"]:
        for entry in store.listdir(name, folder):
            if entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith("checkpoint_"):
                file = store.info(name, folder, entry.base_name, CHECKPOINT_FILE)
                if file.type == pyarrow.fs.FileType.File:
                    found.append((file.mtime_ns or 0, f"{folder}/{entry.base_name}"))
    return store.uri(name, *max(found)[1].split("/")) if found else None


def best_checkpoint(sweep_dir: str) -> str:
    """The checkpoint of a finished sweep's (or ``train`` run's) best trial, for a downstream ``model.init``."""
    trial_id = winner_trial(sweep_dir)
    if trial_id is None:
        raise SweepError(f"sweep {sweep_dir!r} has no finished trial with a result: no checkpoint to start from")
    path = trial_checkpoint(sweep_dir, trial_id)
    if path is None:
        raise SweepError(f"the best trial {trial_id} of {sweep_dir!r} left no checkpoint")
    return path


def resolve_run(reference: str, storage: str) -> str:
    """``run:NAME``: the best checkpoint of sweep (or ``train`` run) NAME under ``storage``."""
    return best_checkpoint(find_sweep(reference[len(RUN_PREFIX):], storage))
