"""One writer per labels dataset: a lease that an incremental run holds while it works.

Two nightly runs that overlap would otherwise both find the same new images and both label
them. The lease is a file per holder, numbered (a generation), in the dataset::

    labels/_lease/000041.json   {"host", "pid", "started", "expires", "released"}

A run takes the lease by creating the next generation's file, which only one writer can do
(:func:`maskrcnn.storage.create_new`: ``If-None-Match: *`` on S3, a hard link locally), and
only when the newest one is released or has expired. The holder renews its expiry from a
thread while it works; a holder that was killed stops renewing, and the next run takes over
once ``ttl`` seconds have passed (its interrupted run is then resumed, exactly once, as any
run is). A holder that finds a newer generation than its own has lost the lease, and
:meth:`Lease.check` stops it before it writes another file. Clocks of the hosts are compared,
so ``ttl`` must exceed their skew by far (minutes, not seconds).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

from maskrcnn import storage
from maskrcnn.errors import UserError

FOLDER = "_lease"
DEFAULT_TTL = 600.0  # seconds; renewed every third of it


class LeaseHeld(UserError):
    """Another run holds the dataset's lease: try again later (exit status 75, EX_TEMPFAIL)."""

    exit_status = 75


class LeaseLost(LeaseHeld):
    """This run's lease expired and another run took the dataset over."""


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def describe(holder: dict[str, Any]) -> str:
    """``host H pid P since T`` of a lease file's content."""
    return f"host {holder.get('host')} pid {holder.get('pid')} since {holder.get('started')}"


def holder(dataset: str) -> dict[str, Any] | None:
    """Who holds the dataset's lease now (its lease file's content), or None."""
    _, content = Lease(dataset)._newest()
    if content is None or content.get("released") or content["expires"] <= time.time():
        return None
    return content


class Lease:
    """The lease on ``dataset``; ``with Lease(...)`` takes it (waiting up to ``wait`` seconds
    for another holder) and releases it. Raises :class:`LeaseHeld` when it cannot be taken."""

    def __init__(self, dataset: str, ttl: float = DEFAULT_TTL, wait: float = 0.0):
        if ttl <= 0 or wait < 0:
            raise ValueError(f"a lease needs ttl > 0 and wait >= 0, got ttl={ttl}, wait={wait}")
        self.dataset, self.ttl, self.wait = dataset, ttl, wait
        self.folder = storage.join(dataset, FOLDER)
        self.generation = 0
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": _stamp(time.time())}
        self._lost: str | None = None
        self._expires = 0.0  # of this run's lease, as last written
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ---------------------------------------------------------------- taking and giving back

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        while True:
            newest, content = self._newest()
            if content is None or content.get("released") or content["expires"] <= time.time():
                if self._create(newest + 1):
                    self._forget_before(newest + 1)
                    self._renewer = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
                    self._renewer.start()
                    return
                continue  # another run created that generation first: look again
            if time.monotonic() >= deadline:
                left = content["expires"] - time.time()
                raise LeaseHeld(
                    f"{self.dataset} is being labelled by another run ({describe(content)}; its lease "
                    f"expires in {left:.0f} s unless renewed): try again later"
                )
            time.sleep(max(0.1, min(5.0, deadline - time.monotonic(), self.ttl / 3)))

    def release(self) -> None:
        """Stop renewing; mark this generation released, unless another run has taken over."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if self.generation and self._lost is None and not self._newer_exists():
            self._write(dict(self.holder, expires=time.time(), released=True))

    def check(self) -> None:
        """Raise :class:`LeaseLost` if this run no longer holds the lease; call it before each write."""
        if self._lost is None and self._expires <= time.time():
            self._lost = f"{self.dataset}: this run's lease expired before it could be renewed"
        if self._lost is not None:
            raise LeaseLost(self._lost)

    def summary(self) -> dict[str, Any]:
        return {"generation": self.generation, **self.holder, "ttl_s": self.ttl}

    # ---------------------------------------------------------------- the files

    def _uri(self, generation: int) -> str:
        return storage.join(self.folder, f"{generation:06d}.json")

    def _generations(self) -> list[int]:
        found = []  # listing a folder that is not there yet lists nothing
        for uri in storage.iter_files(self.folder):
            name = uri.rsplit("/", 1)[-1]
            if name.endswith(".json") and name[:-5].isdigit():
                found.append(int(name[:-5]))
        return sorted(found)

    def _newest(self) -> tuple[int, dict[str, Any] | None]:
        generations = self._generations()
        if not generations:
            return 0, None
        newest = generations[-1]
        try:
            return newest, json.loads(storage.read_text(self._uri(newest)))
        except (storage.StorageError, ValueError):
            return newest, {"expires": 0}  # deleted or unreadable since it was listed: look again via create

    def _create(self, generation: int) -> bool:
        content = dict(self.holder, expires=time.time() + self.ttl, released=False)
        if not storage.create_new(self._uri(generation), json.dumps(content).encode()):
            return False
        self.generation, self._expires = generation, content["expires"]
        return True

    def _write(self, content: dict[str, Any]) -> None:
        storage.write_text(self._uri(self.generation), json.dumps(content))

    def _newer_exists(self) -> bool:
        return storage.exists(self._uri(self.generation + 1))

    def _forget_before(self, generation: int) -> None:
        """Delete the older generations' files (best effort: they only record the past)."""
        for old in self._generations():
            if old < generation:
                try:
                    storage.delete(self._uri(old))
                except storage.StorageError:
                    pass

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if self._newer_exists():
                    self._lost = f"{self.dataset}: this run's lease expired and another run took the dataset over"
                    return
                expires = time.time() + self.ttl
                self._write(dict(self.holder, expires=expires, released=False))
                self._expires = expires
            except storage.StorageError:
                continue  # a passing storage error: the next renewal tries again before expiry
