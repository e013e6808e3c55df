"""Where sweeps are kept: a local (or shared) path, or any URI ``pyarrow.fs`` opens (``s3://``, ``gs://``,
``hdfs://``, ``abfs://``), as Ray Tune takes it. The bottom layer of ``search``, with ``search.layout``.

Ray Tune and Ray Train write the experiment (its state, each trial's results and checkpoints) to the
storage themselves. This project's own files of a sweep (``recipe-search/``: spec, state, MLflow run
map, the Optuna SQLite study, the lease; the best recipe, the report, ``ray.log``) are written by the
driver to a local folder first: the sweep's folder itself on a path, a *mirror* of it in the user's
cache on object storage (object stores have no appends, renames or SQLite). A ``MirrorSync`` pushes
the mirror to the storage while the driver runs and when it stops; ``status``, ``best``, ``report``
and ``resume`` pull it from the storage first, so any machine and working directory that reaches the
storage reads the same sweep.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

from spaces import SweepError

__all__ = ["MirrorSync", "Storage", "display", "is_uri", "join", "mark_mirror", "mirror_root", "split_uri", "storage_of"]

logger = logging.getLogger("recipe_search")

REMOTE_FILE = "recipe-search/remote.json"  # in a mirror only: the storage and name it mirrors
UNPUSHED_FILE = "recipe-search/unpushed"  # in a mirror only: its driver's last push did not land
# What a mirror holds and a pull fetches: the project's folders of a sweep and its confirmation, and
# the files at the sweep's top that are the project's (Tune's files there are Tune's to read).
_PULLED_DIRS = ("recipe-search", "confirm/recipe-search")
_PULLED_FILES = ("best_recipe.yaml", "report.html", "study.png", "study.md")


def is_uri(location: str) -> bool:
    """Whether ``location`` names a file system by scheme (``s3://...``) rather than a local path."""
    scheme = urlsplit(location).scheme
    return "://" in location and len(scheme) > 1 and scheme != "file"


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/runs/NAME?query``: its parent (with the query) and its last name."""
    parts = urlsplit(uri)
    root, _, name = parts.path.rstrip("/").rpartition("/")
    return urlunsplit((parts.scheme, parts.netloc, root, parts.query, "")), name


def join(location: str, *parts: str) -> str:
    """``parts`` under ``location``: a path joined, or a URI's path extended (its query kept)."""
    if not is_uri(location):
        return os.path.join(location, *parts)
    split = urlsplit(location)
    return urlunsplit((split.scheme, split.netloc, "/".join([split.path.rstrip("/"), *[p.strip("/") for p in parts if p]]), split.query, ""))


def mirror_root() -> str:
    """Where mirrors of sweeps on object storage live on this machine: ``$RECIPE_SEARCH_CACHE`` or
    ``~/.cache/recipe-search`` (outside any working directory: a Ray Job's is deleted with the job)."""
    return os.path.expanduser(os.environ.get("RECIPE_SEARCH_CACHE") or os.path.join("~", ".cache", "recipe-search"))


def display(location: str) -> str:
    """A location for messages: a path as it is; a URI without its user, password and query."""
    return _short(location) if is_uri(location) else location


def _short(uri: str) -> str:
    """A URI for messages: its query (endpoints, maybe credentials) left out."""
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


@dataclass
class Storage:
    """The root under which sweeps are kept, opened through ``pyarrow.fs``."""

    location: str  # as given: a URI, or an absolute local path
    fs: Any  # pyarrow.fs.FileSystem
    path: str  # the root's path on ``fs``

    @property
    def remote(self) -> bool:
        return is_uri(self.location)

    @classmethod
    def open(cls, location: str) -> "Storage":
        """``--storage``: a path (``~`` expanded, made absolute), or a URI pyarrow opens; one-line errors."""
        import pyarrow.fs

        if not is_uri(location):
            path = os.path.abspath(os.path.expanduser(location.removeprefix("file://")))
            return cls(path, pyarrow.fs.LocalFileSystem(), path)
        try:
            fs, path = pyarrow.fs.FileSystem.from_uri(location)
        except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError, ValueError) as err:
            raise SweepError(f"--storage {_short(location)!r} cannot be opened: {str(err).splitlines()[0][:200]}") from None
        return cls(location, fs, path.rstrip("/"))

    @property
    def public(self) -> str:
        """The location as files may keep it: a URI's password left out (its query kept)."""
        if not self.remote:
            return self.location
        split = urlsplit(self.location)
        netloc = split.netloc.rpartition("@")[2] if split.password else split.netloc
        return urlunsplit((split.scheme, netloc, split.path, split.query, ""))

    def __str__(self) -> str:
        return _short(self.location) if self.remote else self.location

    def fs_path(self, *parts: str) -> str:
        return "/".join([self.path, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """A location under the root, as a string Ray and this project open again: a local path, or the
        URI with the same query (endpoint options) as the root's."""
        return join(self.location if self.remote else self.path, *parts)

    def tune_args(self, *parts: str) -> dict[str, Any]:
        """``storage_path``/``storage_filesystem`` of a Tune or Train ``RunConfig`` writing under ``parts``."""
        return {"storage_path": self.fs_path(*parts), "storage_filesystem": self.fs if self.remote else None}

    def info(self, *parts: str):
        try:
            return self.fs.get_file_info(self.fs_path(*parts))
        except OSError as err:
            raise SweepError(f"storage {self}: {str(err).splitlines()[0][:200]}") from None

    def is_file(self, *parts: str) -> bool:
        import pyarrow.fs

        return self.info(*parts).type == pyarrow.fs.FileType.File

    def is_dir(self, *parts: str) -> bool:
        import pyarrow.fs

        return self.info(*parts).type == pyarrow.fs.FileType.Directory

    def check_writable(self) -> None:
        """Write and delete a probe object at the root: a missing bucket, no credentials, a read-only
        mount fail here, in seconds, before Ray starts."""
        probe = self.fs_path(f".recipe-search-probe-{os.getpid()}")
        try:
            if not self.remote:
                self.fs.create_dir(self.path)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"probe")
            self.fs.delete_file(probe)
        except (OSError, ValueError) as err:
            raise SweepError(f"storage {self} cannot be written: {str(err).splitlines()[0][:200]}") from None

    def listdir(self, *parts: str) -> list:
        """The entries of a folder (none when it does not exist)."""
        import pyarrow.fs

        try:
            return self.fs.get_file_info(pyarrow.fs.FileSelector(self.fs_path(*parts), allow_not_found=True))
        except OSError as err:
            raise SweepError(f"storage {self}: {str(err).splitlines()[0][:200]}") from None

    def upload(self, local: str, *parts: str) -> None:
        """A local file written to ``parts`` under the root (one object, whole or not at all)."""
        try:
            with open(local, "rb") as source, self.fs.open_output_stream(self.fs_path(*parts)) as f:
                shutil.copyfileobj(source, f, 1 << 20)
        except OSError as err:
            raise SweepError(f"storage {self}: {'/'.join(parts)} cannot be written: {str(err).splitlines()[0][:200]}") from None

    def mirror(self, name: str) -> str:
        """The local folder that mirrors sweep ``name`` of this (remote) storage: its driver's."""
        key = hashlib.sha256(self.location.encode()).hexdigest()[:16]
        return os.path.join(mirror_root(), "mirrors", key, name)

    def pull(self, name: str, reading: bool = False) -> str:
        """The project's files of sweep ``name`` fetched from the storage into a local folder; that folder.

        ``reading`` (status, best, report, run:NAME): a copy of this process's own, removed when it exits, so
        that reading never touches the mirror a driver on this machine writes. Else (a driver that resumes it):
        into the sweep's mirror, replacing it; what an earlier driver here could not push is pushed first."""
        if reading:
            import atexit

            folder = tempfile.mkdtemp(prefix="read-", dir=_makedirs(os.path.join(mirror_root(), "reads")))
            atexit.register(shutil.rmtree, folder, True)
            target = os.path.join(folder, name)
        else:
            target = self.mirror(name)
            if os.path.exists(os.path.join(target, UNPUSHED_FILE)):
                if not MirrorSync(target, self, name).stop():
                    raise SweepError(
                        f"sweep {name!r}: files its last driver here could not push to storage {self} are kept in {target}, "
                        "and the storage still refuses them (see ray.log there); resume once it takes writes"
                    )
            shutil.rmtree(target, ignore_errors=True)
        self._fetch(name, target)
        mark_mirror(target, self, name)
        return target

    def _fetch(self, name: str, target: str) -> None:
        import pyarrow.fs

        wanted = [self.fs_path(name, f) for f in _PULLED_FILES]
        for folder in _PULLED_DIRS:
            for entry in self.fs.get_file_info(pyarrow.fs.FileSelector(self.fs_path(name, folder), allow_not_found=True, recursive=True)):
                if entry.type == pyarrow.fs.FileType.File:
                    wanted.append(entry.path)
        os.makedirs(os.path.join(target, "recipe-search"), exist_ok=True)
        for source in wanted:
            path = os.path.join(target, os.path.relpath(source, self.fs_path(name)))
            try:
                with self.fs.open_input_stream(source) as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)

    def new_mirror(self, name: str) -> str:
        """An empty mirror for a new sweep ``name`` (a leftover of an earlier sweep of that name removed)."""
        mirror = self.mirror(name)
        shutil.rmtree(mirror, ignore_errors=True)
        os.makedirs(os.path.dirname(mirror), exist_ok=True)
        return mirror


def storage_of(sweep_dir: str) -> Optional[tuple[Storage, str]]:
    """The storage and name a mirror folder mirrors; None for a sweep folder on a path."""
    try:
        with open(os.path.join(sweep_dir, REMOTE_FILE)) as f:
            remote = json.load(f)
        return Storage.open(remote["storage"]), remote["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _makedirs(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def mark_mirror(sweep_dir: str, storage: Storage, name: str) -> None:
    """Record in a mirror which storage and sweep it mirrors (readable by this user alone: a URI may hold credentials)."""
    os.makedirs(os.path.join(sweep_dir, "recipe-search"), exist_ok=True)
    fd = os.open(os.path.join(sweep_dir, REMOTE_FILE), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"storage": storage.location, "name": name}, f)


def _snapshot(path: str) -> bytes:
    """A file's bytes to upload; an SQLite database through SQLite's backup (a consistent copy while
    the searcher writes to it, never a half-written page)."""
    if path.endswith(".db"):
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "copy.db")
            source, target = sqlite3.connect(path), sqlite3.connect(copy)
            try:
                source.backup(target)
            finally:
                target.close()
                source.close()
            with open(copy, "rb") as f:
                return f.read()
    with open(path, "rb") as f:
        return f.read()


class MirrorSync:
    """Pushes a mirror to its storage: the files that changed, every ``period_s`` from a daemon thread
    and on ``flush``; files gone from the mirror (a released lease) are deleted there too. ``ray.log``
    goes up on ``flush`` only (it grows all the time). Upload errors are logged and tried again."""

    def __init__(self, sweep_dir: str, storage: Storage, name: str, period_s: float = 5.0):
        self.sweep_dir, self.storage, self.name, self.period_s = sweep_dir, storage, name, period_s
        self._pushed: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "MirrorSync":
        self._thread = threading.Thread(target=self._run, name="recipe-search-mirror", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.push(logs=False)

    def _local_files(self, logs: bool) -> dict[str, tuple[int, int]]:
        found = {}
        for root, _, files in os.walk(self.sweep_dir):
            for file in files:
                path = os.path.join(root, file)
                rel = os.path.relpath(path, self.sweep_dir)
                if rel in (REMOTE_FILE, UNPUSHED_FILE) or file.endswith((".tmp", ".beat", "-journal", "-wal", "-shm")) or (file == "ray.log" and not logs):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    info = os.stat(path)
                    found[rel] = (info.st_mtime_ns, info.st_size)
        return found

    def push(self, logs: bool = True) -> bool:
        """Upload what changed since the last push; True when everything landed."""
        with self._lock:
            ok = True
            current = self._local_files(logs)
            for rel, stamp in current.items():
                if self._pushed.get(rel) == stamp:
                    continue
                try:
                    data = _snapshot(os.path.join(self.sweep_dir, rel))
                    with self.storage.fs.open_output_stream(self.storage.fs_path(self.name, rel)) as f:
                        f.write(data)
                    self._pushed[rel] = stamp
                except FileNotFoundError:
                    continue
                except (OSError, sqlite3.Error) as err:
                    ok = False
                    logger.warning("storage %s: %s not uploaded (tried again): %s", self.storage, rel, str(err).splitlines()[0][:200])
            for rel in [r for r in self._pushed if r not in current and (logs or not r.endswith("ray.log"))]:
                try:
                    self.storage.fs.delete_file(self.storage.fs_path(self.name, rel))
                    del self._pushed[rel]
                except FileNotFoundError:
                    del self._pushed[rel]
                except OSError as err:
                    ok = False
                    logger.warning("storage %s: %s not deleted (tried again): %s", self.storage, rel, str(err).splitlines()[0][:200])
            return ok

    def stop(self) -> bool:
        """Stop the thread and push the rest (with ``ray.log``); False when something did not land (the mirror
        is then marked: the next driver here pushes it before it pulls)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        ok = self.push(logs=True)
        marker = os.path.join(self.sweep_dir, UNPUSHED_FILE)
        if ok:
            with contextlib.suppress(FileNotFoundError):
                os.remove(marker)
        else:
            with contextlib.suppress(OSError), open(marker, "w"):
                pass
        return ok

    def remove_all(self) -> None:
        """Delete everything this sync pushed (a launch that failed before its first trial leaves nothing)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            for rel in list(self._pushed):
                with contextlib.suppress(OSError):
                    self.storage.fs.delete_file(self.storage.fs_path(self.name, rel))
            self._pushed.clear()
