"""Password hashes for the status page's users (``[web] users_file``): stdlib scrypt (RFC 7914).

A users file has one ``name:hash`` line per user (``#`` comments and blank lines allowed); a hash
is ``scrypt$N$r$p$salt$key`` with salt and key in unpadded base64. Make a line with::

    python -m reader.passwords NAME        # asks for the password twice, prints the line

Only hashes are kept; a password is compared by deriving its key with the stored parameters and
comparing in constant time; an unknown user costs the same derivation.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WebUser", "hash_password", "parse_users", "read_users", "verify"]

_N, _R, _P = 2**14, 8, 1  # about 16 MiB and 50 ms per derivation
_KEY_BYTES = 32
_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_HASH = re.compile(r"^scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)$")


@dataclass(frozen=True)
class WebUser:
    """A user of the status page: name and scrypt hash (never the password)."""

    name: str
    password_hash: str

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError("a user name is 1-64 letters, digits or . _ @ -")
        if not _HASH.match(self.password_hash):
            raise ValueError("a password hash is scrypt$N$r$p$salt$key (python -m reader.passwords NAME)")

    def __repr__(self) -> str:
        return f"WebUser(name={self.name!r}, password_hash=<redacted>)"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8", "surrogateescape"), salt=salt, n=n, r=r, p=p,
                          maxmem=2 * 128 * r * (n + p + 2), dklen=_KEY_BYTES)


def hash_password(password: str) -> str:
    """A new hash of ``password`` with a random salt."""
    salt = os.urandom(16)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(_derive(password, salt, _N, _R, _P))}"


_DUMMY = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


def verify(password: str, password_hash: str | None) -> bool:
    """True when ``password`` matches ``password_hash``; None (an unknown user) costs the same."""
    match = _HASH.match(password_hash or _DUMMY)
    if match is None:
        return False
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    if n > 2**20 or r > 64 or p > 16:  # a crafted file must not make sign-in a memory bomb
        return False
    key = _derive(password, _unb64(match.group(4)), n, r, p)
    return password_hash is not None and hmac.compare_digest(key, _unb64(match.group(5)))


def parse_users(text: str) -> tuple[WebUser, ...]:
    """The users of a users file's text; ValueError naming the line of a bad entry."""
    users: dict[str, WebUser] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, password_hash = line.partition(":")
        if not sep:
            raise ValueError(f"line {number}: expected name:hash")
        try:
            user = WebUser(name.strip(), password_hash.strip())
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from exc
        if user.name in users:
            raise ValueError(f"line {number}: user {user.name!r} listed twice")
        users[user.name] = user
    return tuple(users.values())


def read_users(path: Path) -> tuple[WebUser, ...]:
    """The users of a users file; OSError or ValueError."""
    return parse_users(path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    """``python -m reader.passwords NAME``: print a users-file line for NAME."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not _NAME.match(args[0]):
        print("usage: python -m reader.passwords NAME   (prints NAME:HASH for [web] users_file)",
              file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        print("a password has at least 8 characters", file=sys.stderr)
        return 1
    print(f"{args[0]}:{hash_password(password)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
