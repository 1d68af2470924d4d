"""One writer per destination: a lease object under it that names the run writing there.

Built on Storage's conditional writes (S3 If-None-Match / If-Match; a folder lock locally), so of
two stages started at once into one destination exactly one goes on; the other is refused in one
line naming the holder.
"""
from __future__ import annotations

import os

from ..errors import UserError
from ..storage import Storage


class Lease:
    """An object that says who is writing under a prefix, until when; renewed while the work
    goes on, removed at the end. Taken with a conditional write, so of two runs starting at
    once exactly one gets it; a lease whose holder died expires after `ttl` seconds."""

    def __init__(self, storage: Storage, uri: str, what: str, ttl: float = 60.0):
        import getpass
        import socket
        import uuid

        self.storage, self.uri, self.what, self.ttl = storage, uri, what, ttl
        self.host = socket.gethostname()
        self.owner = f"{getpass.getuser()}@{self.host} pid {os.getpid()}"
        self.token = uuid.uuid4().hex
        self.version: str | None = None
        self._stop = None

    def _body(self) -> bytes:
        import json
        import time

        now = time.time()
        return json.dumps({"owner": self.owner, "host": self.host, "pid": os.getpid(),
                           "token": self.token, "what": self.what,
                           "renewed": now, "expires": now + self.ttl}).encode()

    def _current(self) -> tuple[dict | None, str | None]:
        import json

        version = self.storage.version(self.uri)
        if version is None:
            return None, None
        try:
            return json.loads(self.storage.read_bytes(self.uri)), version
        except (ValueError, UserError):
            return {}, version

    def acquire(self) -> "Lease":
        import threading
        import time

        for _ in range(3):
            held, version = self._current()
            if held and held.get("expires", 0) > time.time() and not self._holder_gone(held):
                when = time.strftime("%H:%M:%S", time.localtime(held["expires"]))
                raise UserError(f"{self.uri.rsplit('/', 1)[0]} is being written by another run "
                                f"({held.get('what')}, {held.get('owner')}), whose lease runs until "
                                f"{when} and is renewed while it works; wait for it to finish "
                                f"(or, if that run is gone, until the lease expires)")
            if self._write_over(version):
                break
        else:
            raise UserError(f"{self.uri}: another run keeps taking the lease; try again later")
        self._stop = threading.Event()
        threading.Thread(target=self._renew, daemon=True).start()
        return self

    def _holder_gone(self, held: dict) -> bool:
        """A holder on this machine whose process is gone (killed): no need to wait it out."""
        if held.get("host") != self.host or not held.get("pid"):
            return False
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    return   # taken over: confirm() says so before anything is marked done
            except Exception:   # noqa: BLE001 - an outage: the next renewal tries again
                pass

    def _write_over(self, version: str | None) -> bool:
        """Write this run's lease if the object is still at `version`; False if it is not."""
        if self.storage.write_if(self.uri, self._body(), version):
            self.version = self.storage.version(self.uri)
            return True
        return False

    def renew(self) -> bool:
        """Extend the lease; False when another run has taken it (it expired while this run
        could not reach the storage, and the other run started before it could renew)."""
        return self._write_over(self.version)

    def confirm(self) -> None:
        """Still ours? Called right before the work is marked complete: a run that lost its
        lease must not report (or mark) as done what another run may have overwritten."""
        if self.renew():
            return
        held, _ = self._current()
        holder = f" ({held.get('what')}, {held.get('owner')})" if held else ""
        raise UserError(f"{self.uri.rsplit('/', 1)[0]}: this run lost its lease to another "
                        f"run{holder} while it could not renew it (the storage was unreachable "
                        f"for over {self.ttl:.0f} s); what it wrote there may have been "
                        "overwritten, so it was not marked complete: once no other run writes "
                        "there, run the same command again")

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
        held, _ = self._current()
        if held and held.get("token") == self.token:
            self.storage.delete(self.uri)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        try:
            self.release()
        except UserError:
            pass   # the lease expires by itself
        return False
