"""Incremental removal of expired records, in the manner of verify(8).

DESCRIPTION
    A cleanup pass walks the greylist database, then the client table and
    the correspondent table, and removes what expired() says has expired
    (decide.py), and records that do not parse; the client table loses
    entries whose time stamp is more than greylist_max_age old, the
    correspondent table those more than greylist_correspondent_lifetime
    old, the postscreen table "permit STAMP" entries more than
    greylist_max_age old (core/tables.py). With greylist_client_match =
    pool or domain the client table also loses the automatic entries of
    whole prefixes or domains that versions before 0.5 wrote there
    (core/triple.py, stale_group_key). A pass starts when the last
    full pass completed greylist_cleanup_interval ago.

    The pass is shared by all processes. Its position, counts and the
    time the last pass completed are kept in the state file NAME.cleanup
    beside NAME.lmdb (config.py resolves the name). A step takes a non-blocking fcntl lock on that file
    (another process cleaning means: skip), reads the state, walks one
    batch of BATCH records under a shared lock of the database, deletes
    the expired ones under a short exclusive lock, writes the state and
    releases everything. So at most one process cleans at a time, no
    lock or transaction is held across steps or requests, and a pass
    resumes where the last step left off, in whatever process. The walk
    re-seeks with set_range after the last key it saw, so a deleted
    position does not end it (Postfix's own iterator stops there).

    A delete reads the record again inside the write transaction and
    keeps it if it is no longer expired: a record refreshed between the
    walk and the delete is never lost.

    Policy processes run steps after a reply has been sent, for at most
    budget_s (BUDGET_S) each time, so a waiting request is delayed by a
    few milliseconds at most. greylistctl cleanup runs steps until the
    pass completes, walking MANUAL_BATCH records per shared lock. Either
    way a write transaction deletes at most delete_batch (DELETE_BATCH)
    records, so the exclusive lock is held for one short commit.

DIAGNOSTICS
    "cleanup: full retained=N dropped=M" when a pass completes (the
    counts are for the whole pass, whichever processes took part), and
    "cleanup: partial retained=N dropped=M" when a pass is given up
    because of a database error or an interrupted greylistctl. A state
    file that does not parse starts a new pass, with a warning. The
    counts are those of the steps whose state was written: a process
    killed between a step's delete and its state write leaves that
    step's deletions (at most delete_batch) out of them; the records
    are gone all the same, and the next step walks on from the last
    position written.
"""

import os
import time
from typing import Callable, NamedTuple

from greylist.config import Config
from greylist.core import record as records
from greylist.core.decide import expired
from greylist.core.tables import permit_expired, screen_denied
from greylist.core.triple import stale_group_key
from greylist.stores.base import Store, StoreError
from greylist.stores.lmdbfile import check_directory
from greylist.stores.lock import EXCLUSIVE, LockBusy, lock, unlock

# The tables of a pass, in the order walked (State.position names one).
DATABASE = 0
CLIENT_TABLE = 1
CORRESPONDENT_TABLE = 2
POSTSCREEN_TABLE = 3
BATCH = 64
MANUAL_BATCH = 1024
# At most this many deletes per write transaction: the exclusive lock,
# which makes requests wait, is held for one commit of at most this many.
DELETE_BATCH = 128
BUDGET_S = 0.005
# How long a policy process waits before it looks at the state again
# after finding another process cleaning.
BUSY_RETRY_S = 1
# How long a policy process waits after a cleanup step failed.
FAILURE_RETRY_S = 60


class State(NamedTuple):
    """The shared cleanup state; position None means no pass in progress."""

    last_completed: int = 0
    position: tuple[int, bytes] | None = None
    retained: int = 0
    dropped: int = 0
    started: int = 0


def parse_state(text: str) -> State | None:
    """Return the state written by format_state(), or None if it does not parse."""
    fields = text.split()
    if len(fields) != 7 or fields[0] != "1" or fields[2] not in ("-", "0", "1", "2", "3"):
        return None
    try:
        last, retained, dropped, started = (int(fields[i]) for i in (1, 4, 5, 6))
        position = None if fields[2] == "-" else (int(fields[2]), bytes.fromhex(
            "" if fields[3] == "-" else fields[3]))
    except ValueError:
        return None
    return State(last, position, retained, dropped, started)


def format_state(state: State) -> str:
    """Return the one-line text of a state."""
    table, key = state.position if state.position is not None else ("-", b"")
    return "1 %d %s %s %d %d %d\n" % (state.last_completed, table, key.hex() or "-",
                                      state.retained, state.dropped, state.started)


class Cleaner:
    """Cleanup steps for one process over the database and the client table."""

    def __init__(self, store: Store, table: Store | None, cfg: Config,
                 log, clock: Callable[[], float] = time.time, batch: int = BATCH,
                 delete_batch: int = DELETE_BATCH, budget_s: float = BUDGET_S,
                 correspondents: Store | None = None,
                 postscreen: Store | None = None) -> None:
        """store is the database, table the client table and correspondents
        the correspondent table (each None if there is none), as stored
        (not through privacy.HashedKeys); cfg.cleanup_state names the
        state file."""
        # Table number (State.position) -> store, in the order walked.
        self.stores = {DATABASE: store}
        if table is not None:
            self.stores[CLIENT_TABLE] = table
        if correspondents is not None:
            self.stores[CORRESPONDENT_TABLE] = correspondents
        if postscreen is not None:
            self.stores[POSTSCREEN_TABLE] = postscreen
        self.batch = batch
        self.delete_batch = delete_batch
        self.budget_s = budget_s
        self.cfg = cfg
        self.log = log
        self.clock = clock
        self.path = cfg.cleanup_state
        self._fd = -1
        self._next_check = 0.0
        # The longest delete transaction of this process, lock wait included.
        self.longest_write_s = 0.0
        # Whether this process skipped a broken table in the pass.
        self._skipped = False

    def close(self) -> None:
        """Close the state file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def step(self, budget_s: float | None = None, start: bool = False) -> State | None:
        """Advance the shared pass for about budget_s (default: the
        constructor's); return the state.

        Returns None, without waiting, when cleanup is disabled or not
        yet due to be looked at, or when another process holds the state
        lock; a state whose position is None when no pass is in progress.
        With start=True (greylistctl, which drives a pass to its end) a
        pass begins even if none is due, also when cleanup is disabled, and
        a failure raises StoreError instead of a warning and a retry a
        minute later: None then means only that another process holds the
        state lock.
        """
        now = int(self.clock())
        if self.cfg.cleanup_interval_s == 0 and not start:
            return None
        if now < self._next_check and not start:
            return None
        if self.stores[0].failing:
            if start:
                raise StoreError("the database is unavailable after an earlier error")
            return None  # Already reported by the store's user.
        try:
            fd = self._state_fd()
            lock(fd, EXCLUSIVE, wait=False)
        except LockBusy:
            self._next_check = now + BUSY_RETRY_S
            return None
        except (OSError, StoreError) as exc:
            reason = "cleanup state %s: %s" % (self.path, getattr(exc, "strerror", None) or exc)
            if start:
                raise StoreError(reason) from None
            self._next_check = now + FAILURE_RETRY_S
            self.log.warning(reason)
            return None
        try:
            state = self._read(fd)
            if state is None:
                # A new state file: the interval starts now.
                state = State(last_completed=now)
                self._write(fd, state)
            if state.last_completed > now:
                # The clock was set back (a pass ran while it was ahead):
                # when the last pass ran is unknown, so one is due now,
                # not when the clock reaches the future.
                state = state._replace(last_completed=now - self.cfg.cleanup_interval_s)
            if state.position is None:
                due = state.last_completed + self.cfg.cleanup_interval_s
                if now < due and not start:
                    self._next_check = due
                    return state
                state = State(state.last_completed, (0, b""), 0, 0, now)
            state = self._walk(state, now, self.budget_s if budget_s is None else budget_s)
            self._write(fd, state)
            return state
        except OSError as exc:
            # The state file cannot be written (a full disk, a read-only
            # file system): no traceback after a reply, a warning, and a
            # retry later. The deletes done are committed; the position
            # is walked again.
            if start:
                raise StoreError("cleanup state %s: cannot write: %s"
                                 % (self.path, exc.strerror or exc)) from None
            self._next_check = now + FAILURE_RETRY_S
            self.log.warning("cleanup state %s: cannot write: %s; trying again in %d s"
                             % (self.path, exc.strerror or exc, FAILURE_RETRY_S))
            return None
        finally:
            unlock(fd)

    def _walk(self, state: State, now: int, budget_s: float) -> State:
        deadline = time.monotonic() + budget_s
        while True:
            table, after = state.position
            if table not in self.stores:
                # A table this process does not have (settings changed).
                state = state._replace(position=self._after(table))
                if state.position is None:
                    return self._completed(state, now)
                continue
            deleted = 0
            try:
                items = self.stores[table].scan(after or None, self.batch)
                doomed = [k for k, v in items if self._doomed(table, v, now, k)]
                for start in range(0, len(doomed), self.delete_batch):
                    began = time.monotonic()
                    deleted += self.stores[table].delete_if(
                        doomed[start:start + self.delete_batch],
                        lambda k, v: v is not None and self._doomed(table, v, now, k))
                    self.longest_write_s = max(self.longest_write_s,
                                               time.monotonic() - began)
            except StoreError as exc:
                # Deletes committed before the failure are counted now: the
                # next walk of this batch no longer sees them.
                state = state._replace(dropped=state.dropped + deleted)
                if table != DATABASE:
                    # A broken table must not stop cleanup of the database
                    # for ever: this pass goes on without it.
                    self.log.warning("cleanup: skipping a table in this pass: %s" % exc)
                    self._skipped = True
                    state = state._replace(position=self._after(table))
                    if state.position is None:
                        return self._completed(state, now)
                    continue
                self.log.warning("cleanup stopped: %s" % exc)
                self.log.info("cleanup: partial retained=%d dropped=%d"
                              % (state.retained, state.dropped))
                # Keep the position; try again later, not at every request.
                self._next_check = now + FAILURE_RETRY_S
                return state
            state = state._replace(retained=state.retained + len(items) - deleted,
                            dropped=state.dropped + deleted,
                            position=(table, items[-1][0] if items else after))
            if len(items) < self.batch:
                state = state._replace(position=self._after(table))
                if state.position is None:
                    return self._completed(state, now)
            if time.monotonic() >= deadline:
                return state

    def _after(self, table: int) -> tuple[int, bytes] | None:
        """The start of the next table after table, None after the last."""
        later = [number for number in self.stores if number > table]
        return (later[0], b"") if later else None

    def _completed(self, state: State, now: int) -> State:
        # A pass that skipped a broken table is partial, as verify(8) says
        # of a scan that ended with an error.
        self.log.info("cleanup: %s retained=%d dropped=%d"
                      % ("partial" if self._skipped else "full", state.retained,
                         state.dropped))
        self._skipped = False
        self._next_check = now + self.cfg.cleanup_interval_s
        return state._replace(last_completed=now, position=None)

    def reconfigure(self, cfg: Config) -> None:
        """New settings (greylistd's SIGHUP): the next step judges with
        them and works out again when the next pass is due, so that a
        shorter greylist_cleanup_interval takes effect now."""
        self.cfg = cfg
        self._next_check = 0.0

    def _doomed(self, table: int, value: bytes, now: int, key: bytes = b"") -> bool:
        if table == DATABASE:
            # expired() keeps manual entries for ever.
            record = records.decode(value)
            return record is None or expired(record, now, self.cfg)
        if table == POSTSCREEN_TABLE:
            # Also an entry of an address that the callout now drops or
            # enforces (listed after the entry was written).
            return permit_expired(value, now, self.cfg.max_age_s) or screen_denied(
                key.decode("ascii", "replace"), self.cfg.postscreen_drop_networks,
                self.cfg.postscreen_enforce_networks)
        # The tables: numeric time stamps; anything else is left alone.
        lifetime = (self.cfg.max_age_s if table == CLIENT_TABLE
                    else self.cfg.correspondent_lifetime_s)
        if table == CLIENT_TABLE and value.isdigit() and stale_group_key(
                key, self.cfg.client_match):
            return True
        return value.isdigit() and now - int(value) > lifetime

    def count(self, now: int) -> tuple[int, int]:
        """Walk everything without deleting; return (retained, dropped)."""
        retained = dropped = 0
        for table, store in self.stores.items():
            for key, value in store.items(self.batch):
                if self._doomed(table, value, now, key):
                    dropped += 1
                else:
                    retained += 1
        return retained, dropped

    def abandon(self, state: State) -> None:
        """Give up a pass in progress (greylistctl interrupted), logging it."""
        self.log.info("cleanup: partial retained=%d dropped=%d"
                      % (state.retained, state.dropped))

    def _state_fd(self) -> int:
        if self._fd < 0:
            # Never create files where the database itself is refused.
            check_directory(self.path)
            # Only greylist's own processes use it: 0600 (or less by umask).
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o600)
        return self._fd

    def _read(self, fd: int) -> State | None:
        """The state in the file; None for a new, empty file."""
        text = os.pread(fd, 4096, 0).decode("ascii", "replace")
        if not text:
            return None
        state = parse_state(text)
        if state is None:
            self.log.warning("cleanup state %s does not parse; starting a new pass"
                             % self.path)
            return State()
        return state

    def _write(self, fd: int, state: State) -> None:
        data = format_state(state).encode("ascii")
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
