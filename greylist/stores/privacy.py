"""Privacy mode: database keys as HMAC-SHA256 under a local secret.

DESCRIPTION
    With greylist_privacy = yes, every key (triple, sender entry, client
    entry) is stored as the hexadecimal HMAC-SHA256 of its plaintext
    under a 32-byte secret, instead of the plaintext. Without the secret
    nobody can test a guessed address against the database, unlike
    postgrey's unsalted SHA-1 of a few bits of IPv4 space. The secret is
    kept in greylist_secret_file (default: the database name plus
    ".secret"), created on first use with mode 0600.

    HashedKeys wraps a store so that handlers, which build plaintext
    keys, never need the secret: it hashes every key on its way in.
    The secret is read on first use; a secret that cannot be used makes
    every operation fail with StoreError, which is answered with
    greylist_failure_action like any other store failure.

    What can no longer be read back: the clients, senders and recipients
    of the records (postmap -s and greylistctl dump show hashes). A known
    triple can still be looked up, by hashing it with the same secret.
    Losing the secret starts greylisting over; changing it too.

DIAGNOSTICS
    SecretError when the file cannot be created or read, is readable
    by group or others, or is in a directory that another user can
    write (lmdbfile.check_directory()).
"""

import hashlib
import hmac
import os
import secrets
import stat
from typing import Callable, TypeVar

from greylist.files import read_small
from greylist.stores.base import Change, Store, StoreError, Values
from greylist.stores.lmdbfile import check_directory

T = TypeVar("T")

SECRET_BYTES = 32


class SecretError(Exception):
    """The secret file cannot be used."""


def load_secret(path: str, create: bool = True) -> bytes:
    """Return the secret in path, creating it (mode 0600) if it is missing
    (unless not create: then a missing secret is a SecretError).

    A new secret is written to a temporary file and linked into place,
    so that a concurrent first use (another thread or process) never
    reads a file that exists but holds no secret yet; of two that race,
    the first link wins and both use its secret.
    """
    # Never in a directory another user can write: that user could put a
    # secret of theirs in its place, or remove it (greylisting over).
    try:
        check_directory(path, "secret")
    except StoreError as exc:
        raise SecretError("greylist_secret_file %s: %s" % (path, exc)) from None
    if not create and not os.path.lexists(path):
        raise SecretError("%s does not exist: with a Redis database every host must hash "
                          "with the same secret, so greylist does not make one of its own; "
                          "copy the file from the host that has it (greylistctl makes it "
                          "when it first needs it)" % path)
    if not os.path.lexists(path):
        temporary = "%s.%s.new" % (path, secrets.token_hex(8))
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(secrets.token_hex(SECRET_BYTES) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                try:
                    os.link(temporary, path)
                except FileExistsError:
                    pass  # Another first use won the race: its secret it is.
            finally:
                os.unlink(temporary)
        except OSError as exc:
            raise SecretError("cannot create %s: %s" % (path, exc.strerror)) from None
    try:
        # Never through a symbolic link; a secret is short.
        data, st = read_small(path, 4096, follow=False)
        mode = st.st_mode
        text = data.decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError("cannot read %s: %s" % (path, exc)) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError("%s is accessible by group or others; chmod 600 it" % path)
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise SecretError("%s does not hold a hexadecimal secret of 16 or more bytes"
                          % path)
    return secret


def hashed(secret: bytes, key: bytes) -> bytes:
    """Return the privacy-mode form of a key."""
    return hmac.new(secret, key, hashlib.sha256).hexdigest().encode("ascii")


def looks_hashed(key: bytes) -> bool:
    """Whether a stored key has the form hashed() gives (64 hex digits):
    a database key of privacy mode, as no plaintext key is."""
    return len(key) == 64 and all(c in _HEX for c in key)


_HEX = frozenset(b"0123456789abcdef")


class HashedKeys(Store):
    """A store whose keys are hashed with the secret in a file."""

    def __init__(self, store, secret_file: str, create: bool = True) -> None:
        self.store = store
        self.name = store.name
        self.secret_file = secret_file
        # Whether a missing secret is made (load_secret).
        self.create = create
        self._secret: bytes | None = None

    @property
    def failing(self) -> bool:
        return self.store.failing

    def open(self) -> None:
        self.store.open()

    def close(self) -> None:
        self.store.close()

    def hash(self, key: bytes | None) -> bytes | None:
        """Return the stored form of a plaintext key (None stays None)."""
        if key is None:
            return None
        if self._secret is None:
            try:
                self._secret = load_secret(self.secret_file, self.create)
            except SecretError as exc:
                raise StoreError(str(exc)) from None
        return hashed(self._secret, key)

    def get_many(self, keys: list[bytes | None]) -> Values:
        return self.store.get_many([self.hash(k) for k in keys])

    def get_many_nowait(self, keys: list[bytes | None]) -> Values | None:
        return self.store.get_many_nowait([self.hash(k) for k in keys])

    def get_many_batch(self, batches: list[list[bytes | None]]) -> list[Values]:
        return self.store.get_many_batch([[self.hash(k) for k in keys] for keys in batches])

    def update_many(self, keys: list[bytes | None], change: Change) -> T:
        return self.store.update_many([self.hash(k) for k in keys], change)

    def update_batch(self, ops: list) -> list[object]:
        return self.store.update_batch([([self.hash(k) for k in keys], change)
                                        for keys, change in ops])

    def scan(self, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        # Stored keys are hashes already: the cursor is one of them.
        return self.store.scan(after, limit)

    def items(self, batch: int = 100):
        # The store's own walk (on Redis one SCAN, not one per page).
        return self.store.items(batch)

    def delete_if(self, keys: list[bytes],
                  doomed: Callable[[bytes, bytes | None], bool]) -> int:
        return self.store.delete_if([self.hash(k) for k in keys], doomed)

    def info(self) -> dict[str, int]:
        return self.store.info()
