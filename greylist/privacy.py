"""Privacy mode: database keys as HMAC-SHA256 under a local secret.

DESCRIPTION
    With greylist_privacy = yes, every key (triple, sender entry, client
    entry) is stored as the hexadecimal HMAC-SHA256 of its plaintext
    under a 32-byte secret, instead of the plaintext. Without the secret
    nobody can test a guessed address against the database, unlike
    postgrey's unsalted SHA-1 of a few bits of IPv4 space. The secret is
    kept in greylist_secret_file (default: the database name plus
    ".secret"), created on first use with mode 0600.

    What can no longer be read back: the clients, senders and recipients
    of the records (postmap -s and greylistctl dump show hashes). A known
    triple can still be looked up, by hashing it with the same secret.
    Losing the secret starts greylisting over; changing it too.

DIAGNOSTICS
    SecretError when the file cannot be created or read, or is readable
    by group or others.
"""

import hashlib
import hmac
import os
import secrets
import stat

SECRET_BYTES = 32


class SecretError(Exception):
    """The secret file cannot be used."""


def secret_path(database: str, setting: str) -> str:
    """Return the secret file's name: the setting, or the database's plus .secret."""
    return setting or os.path.abspath(database) + ".secret"


def load_secret(path: str) -> bytes:
    """Return the secret in path, creating it (mode 0600) if it is missing."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SecretError("cannot create %s: %s" % (path, exc.strerror)) from None
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(SECRET_BYTES) + "\n")
    try:
        with open(path, encoding="ascii") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            text = handle.read().strip()
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
