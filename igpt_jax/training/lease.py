"""One writer per workdir: the lease a training run holds on its run directory while it runs.

The lease is a small JSON file in the workdir (``lease.json``: host, process id, start time, heartbeat, a token that
names this holder). A run takes it before it writes anything there; a second run on the same workdir is refused in
one line that names the holder. The holder renews the heartbeat from a daemon thread (every `HEARTBEAT_SECONDS`) and
deletes the file when it leaves. A lease is taken over, with a one-line warning, when

* its heartbeat is older than `STALE_SECONDS` (the holder was killed, or its host lost), or
* its holder ran on this host and that process is gone (a run killed with SIGKILL and rerun at once), or
* ``checkpoint.take_over=True`` forces it.

Every change of the lease is a compare-and-swap on what was read: on a local disk under an ``flock`` of the workdir,
on gs:// with the object's generation as the write's precondition. Of two runs taking over the same stale lease one
wins; the other, and a live holder whose lease was forced away, finds at its next heartbeat
(or before its next checkpoint, which reads the lease) that the lease is no longer its own, and the training loop
stops it with one line before it writes a metric or a checkpoint over the new holder's.

Several processes (a pod slice): process 0 holds the lease for the run; the others learn its outcome from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging
from etils import epath

from igpt_jax import workdir as workdir_files
from igpt_jax.errors import ConfigError, WorkdirInUse

HEARTBEAT_SECONDS = 30.0  # how often the holder renews the heartbeat
STALE_SECONDS = 180.0  # a heartbeat older than this: the holder is gone, its lease is taken over


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lease, as its file says."""

    host: str
    pid: int
    started: float
    heartbeat: float
    token: str

    @classmethod
    def this_process(cls) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return (f"host {self.host}, pid {self.pid}, started {started}, last heartbeat {max(0.0, now - self.heartbeat):.0f}"
                " s ago")

    def to_bytes(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self)) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """The holder a lease file names, or None for a file that does not parse (a torn write: nobody's)."""
        try:
            record = json.loads(data)
            return cls(str(record["host"]), int(record["pid"]), float(record["started"]), float(record["heartbeat"]),
                       str(record["token"]))
        except (ValueError, KeyError, TypeError):
            return None


def process_is_gone(pid: int) -> bool:
    """Whether no live process of this host has this id (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # another user's live process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


class LocalLeaseFile:
    """The lease file on a local disk: reads, and writes and deletes that succeed only if the file still holds what
    was read (checked and done under an exclusive ``flock`` of the workdir itself).

    Attributes:
      last_version: the version of what the last successful `swap` wrote.
    """

    def __init__(self, path: epath.Path):
        self.path = path
        self.last_version: Any = None

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> tuple[bytes | None, Any]:
        """(content, version): (None, None) when there is no lease; the version is what a swap compares."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        return data, data

    def swap(self, expected: Any, data: bytes | None) -> bool:
        """Writes `data` (None: deletes) if the file's version still is `expected` (None: absent); whether it did."""
        with self._locked():
            if self.read()[1] != expected:
                return False
            if data is None:
                self.path.unlink(missing_ok=True)
            else:
                workdir_files.write_atomic(self.path, data)
            self.last_version = data
            return True


class GcsLeaseObject:
    """The lease object on gs:// (google-cloud-storage, which honours ``STORAGE_EMULATOR_HOST``): every write and
    delete carries the generation that was read as its precondition (``ifGenerationMatch``; 0: no object), so GCS
    itself refuses a swap that another writer got in before.

    Attributes:
      last_version: the generation that the last successful `swap` wrote.
    """

    def __init__(self, url: str):
        from google.api_core import exceptions  # noqa: PLC0415  (gs:// only)
        from google.cloud import storage  # noqa: PLC0415

        self.url = url
        bucket, name = url.removeprefix("gs://").split("/", 1)
        self.blob_of = lambda: storage.Client().bucket(bucket).blob(name)
        self.refused = (exceptions.PreconditionFailed, exceptions.NotFound)
        self.last_version: Any = None

    def read(self) -> tuple[bytes | None, Any]:
        for _ in range(5):  # the object changed between its metadata and its content: read again
            blob = self.blob_of()
            try:
                blob.reload()
                return blob.download_as_bytes(if_generation_match=blob.generation), blob.generation
            except self.refused:
                if not blob.exists():
                    return None, None
        raise WorkdirInUse(f"{self.url}: the lease object changes faster than it can be read; another run is "
                           "starting in this workdir")

    def swap(self, expected: Any, data: bytes | None) -> bool:
        blob = self.blob_of()
        try:
            if data is None:
                blob.delete(if_generation_match=expected)
            else:
                blob.upload_from_string(data, content_type="application/json", if_generation_match=expected or 0)
        except self.refused:
            return False
        self.last_version = None if data is None else blob.generation
        return True


def lease_file(workpath: epath.Path) -> LocalLeaseFile | GcsLeaseObject:
    """The lease store of a workdir: `LocalLeaseFile` on a local disk, `GcsLeaseObject` on gs://."""
    path = workpath / workdir_files.LEASE
    if str(workpath).startswith("gs://"):
        return GcsLeaseObject(str(path))
    if "://" in str(workpath):
        raise ConfigError(f"--workdir={workpath}: a training run's workdir is a local path or gs://BUCKET/PATH")
    return LocalLeaseFile(path)


class WorkdirLease:
    """The lease of one run on its workdir (see the module docstring); a context manager.

    Args:
      workpath: the run directory (it exists).
      take_over: take the lease even from a live holder (``checkpoint.take_over``).
      heartbeat_seconds, stale_seconds: the heartbeat period and the age after which a lease is taken over.
      clock: time.time (tests move it).
    """

    def __init__(self, workpath: epath.Path, *, take_over: bool = False, heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 stale_seconds: float = STALE_SECONDS, clock=time.time):
        self.workpath, self.take_over = workpath, take_over
        self.heartbeat_seconds, self.stale_seconds, self.clock = heartbeat_seconds, stale_seconds, clock
        self.store = lease_file(workpath)
        self.holder = dataclasses.replace(Holder.this_process(), started=clock(), heartbeat=clock())
        self._version: Any = None  # what the store holds since our last write
        self._lost: str | None = None  # set by the heartbeat when another run holds the lease now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()  # the heartbeat thread and the training loop both read and write the lease

    def __enter__(self) -> WorkdirLease:
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name="workdir-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    # ------------------------------------------------------------------------------------------------ taking it
    def acquire(self) -> None:
        """Takes the lease (see the module docstring).

        Raises:
          WorkdirInUse: another run holds it, naming that run and how to take over.
        """
        for _ in range(5):  # a swap lost to a concurrent writer: read again and decide again
            data, version = self.store.read()
            current = Holder.from_bytes(data) if data is not None else None
            if data is not None:
                why = self._why_take_over(current)
                if why is None:
                    raise WorkdirInUse(
                        f"workdir {self.workpath} is in use by another run ({current.describe(self.clock())}): stop "
                        f"that run, or rerun once its heartbeat is older than {self.stale_seconds:.0f} s, or pass "
                        "--config.checkpoint.take_over=True")
            if self._write(version):
                if data is not None:
                    logging.warning("took over the lease on %s: %s", self.workpath, why)
                return
        raise WorkdirInUse(f"workdir {self.workpath}: its lease changed under this run five times in a row; another "
                           "run is starting there")

    def _why_take_over(self, current: Holder | None) -> str | None:
        """Why a lease held by `current` may be taken over, or None when it may not."""
        if current is None:
            return "its lease file did not parse"
        said = current.describe(self.clock())
        if self.take_over:
            return f"checkpoint.take_over=True ({said})"
        if self.clock() - current.heartbeat > self.stale_seconds:
            return f"its heartbeat is older than {self.stale_seconds:.0f} s ({said})"
        if current.host == self.holder.host and process_is_gone(current.pid):
            return f"its process is gone ({said})"
        return None

    def _write(self, expected: Any) -> bool:
        if not self.store.swap(expected, self.holder.to_bytes()):
            return False
        self._version = self.store.last_version
        return True

    # ------------------------------------------------------------------------------------------------ holding it
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            self.renew()

    def renew(self) -> bool:
        """Writes a new heartbeat if the lease is still ours; else records who holds it (see `check`)."""
        with self._mutex:
            return self._renew()

    def _renew(self) -> bool:
        if self._lost is not None:
            return False
        self.holder = dataclasses.replace(self.holder, heartbeat=self.clock())
        try:
            if self._write(self._version):
                return True
        except Exception as err:  # noqa: BLE001 -- a storage hiccup: the next heartbeat tries again
            logging.warning("could not renew the lease on %s: %s", self.workpath, err)
            return True
        self._record_loss()
        return False

    def check(self, *, read: bool = False) -> None:
        """Raises when another run holds the lease now: as the last heartbeat found, or (`read`) as the store says
        now (one read; before a checkpoint is written).

        Raises:
          WorkdirInUse: naming the new holder.
        """
        with self._mutex:
            if read and self._lost is None and self.store.read()[1] != self._version:
                self._record_loss()
        if self._lost is not None:
            raise WorkdirInUse(self._lost)

    def _record_loss(self) -> None:
        data, _ = self.store.read()
        other = Holder.from_bytes(data) if data is not None else None
        self._lost = (f"another run took over workdir {self.workpath} "
                      f"({other.describe(self.clock()) if other else 'its lease is gone'}); this run stops "
                      "without writing more there")

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._lost is None:
            with contextlib.suppress(Exception):  # a failing store: the lease goes stale and is taken over
                self.store.swap(self._version, None)
