"""The users file and the password hashes in it (``fastsocks hash-password``: commands/).

The users file
--------------
One user per line, ``NAME:HASH``; blank lines and lines starting with ``#`` are
ignored. NAME is 1-255 bytes of UTF-8 (RFC 1929 §2 carries at most 255), without ``:``
or control characters and without surrounding whitespace; a name appears once. HASH is
one of the self-describing formats below; anything else, a plain password above all, is
refused with an error that names the file and the line, never the text on it.

Hash formats
------------
``$``-separated, after the PHC string format (salt and digest in standard base64,
RFC 4648 §4, without ``=`` padding)::

    scrypt$ln=14,r=8,p=1$<salt>$<digest>         hashlib.scrypt, N = 2**ln
    pbkdf2-sha256$i=600000$<salt>$<digest>       hashlib.pbkdf2_hmac("sha256")

``hash_password()`` writes a 16-byte random salt and a 32-byte digest. scrypt is the
default: ln=14, r=8 (16 MiB) takes ~70 ms here; PBKDF2 uses OWASP's 600,000
iterations (~260 ms here). Costs outside the ranges in ``_SCRYPT_LIMITS`` and
``_PBKDF2_ITERATIONS`` are refused: below them a hash is little better than a plain
password, above them one check would tie up a thread (or the memory) for too long.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final

from fastsocks.errors import ConfigError

SCRYPT: Final = "scrypt"
PBKDF2_SHA256: Final = "pbkdf2-sha256"
SCHEMES: Final = (SCRYPT, PBKDF2_SHA256)

SCRYPT_LN: Final = 14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
PBKDF2_ITERATIONS: Final = 600_000

MAX_NAME_BYTES: Final = 255  # RFC 1929 §2: ULEN and PLEN are one octet
MAX_PASSWORD_BYTES: Final = 255
_SALT_BYTES: Final = 16
_DIGEST_BYTES: Final = 32
_SALT_RANGE: Final = (8, 64)
_DIGEST_RANGE: Final = (16, 64)
_SCRYPT_LIMITS: Final = {"ln": (10, 20), "r": (1, 32), "p": (1, 16)}
_SCRYPT_MAX_MEMORY_BYTES: Final = 1 << 30
_PBKDF2_ITERATIONS: Final = (10_000, 10_000_000)

_HOW_TO_HASH: Final = "make one with `fastsocks hash-password --user NAME`"


# --- hashes -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, repr=False)
class _ScryptHash:
    ln: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def derive(self, password: bytes) -> bytes:
        n = 1 << self.ln
        return hashlib.scrypt(password, salt=self.salt, n=n, r=self.r, p=self.p,
                              maxmem=_scrypt_memory_bytes(n, self.r, self.p) + (1 << 20),
                              dklen=len(self.digest))

    def encode(self) -> str:
        return f"{SCRYPT}$ln={self.ln},r={self.r},p={self.p}${_b64encode(self.salt)}${_b64encode(self.digest)}"

    def with_random_values(self) -> _ScryptHash:
        return _ScryptHash(self.ln, self.r, self.p, secrets.token_bytes(len(self.salt)),
                           secrets.token_bytes(len(self.digest)))


@dataclass(frozen=True, slots=True, repr=False)
class _Pbkdf2Hash:
    iterations: int
    salt: bytes
    digest: bytes

    def derive(self, password: bytes) -> bytes:
        return hashlib.pbkdf2_hmac("sha256", password, self.salt, self.iterations, dklen=len(self.digest))

    def encode(self) -> str:
        return f"{PBKDF2_SHA256}$i={self.iterations}${_b64encode(self.salt)}${_b64encode(self.digest)}"

    def with_random_values(self) -> _Pbkdf2Hash:
        return _Pbkdf2Hash(self.iterations, secrets.token_bytes(len(self.salt)),
                           secrets.token_bytes(len(self.digest)))


PasswordHash = _ScryptHash | _Pbkdf2Hash


def _matches(stored: PasswordHash, password: bytes) -> bool:
    return hmac.compare_digest(stored.derive(password), stored.digest)


def hash_password(password: str | bytes, scheme: str = SCRYPT, *, scrypt_ln: int = SCRYPT_LN,
                  pbkdf2_iterations: int = PBKDF2_ITERATIONS) -> str:
    """A new hash of ``password`` (str is encoded as UTF-8) with a random salt.

    Raises ValueError for an unknown scheme, a cost outside the accepted range, or a
    password that RFC 1929 cannot carry (empty, or longer than 255 bytes).
    """
    secret = _password_bytes(password)
    problem = password_problem(secret)
    if problem:
        raise ValueError(f"password {problem}")
    salt = secrets.token_bytes(_SALT_BYTES)
    placeholder = bytes(_DIGEST_BYTES)
    if scheme == SCRYPT:
        stored: PasswordHash = _ScryptHash(scrypt_ln, SCRYPT_R, SCRYPT_P, salt, placeholder)
    elif scheme == PBKDF2_SHA256:
        stored = _Pbkdf2Hash(pbkdf2_iterations, salt, placeholder)
    else:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    _check_cost(stored)
    return replace(stored, digest=stored.derive(secret)).encode()


def verify_password(stored: str, password: str | bytes) -> bool:
    """Whether ``password`` matches the hash ``stored``; ValueError if ``stored`` is no known hash."""
    return _matches(parse_hash(stored), _password_bytes(password))


def parse_hash(text: str) -> PasswordHash:
    """The hash in ``text``; ValueError (whose message never quotes ``text``) if malformed."""
    scheme, _, rest = text.partition("$")
    if scheme not in SCHEMES:
        raise ValueError(f"not a password hash in a known format ({', '.join(s + '$...' for s in SCHEMES)}); "
                         f"plain passwords are not accepted: {_HOW_TO_HASH}")
    parts = rest.split("$")
    if len(parts) != 3:
        raise ValueError(f"malformed {scheme} hash: expected {scheme}$PARAMETERS$SALT$DIGEST; {_HOW_TO_HASH}")
    params_text, salt_text, digest_text = parts
    salt = _b64field(salt_text, "salt", _SALT_RANGE, scheme)
    digest = _b64field(digest_text, "digest", _DIGEST_RANGE, scheme)
    if scheme == SCRYPT:
        params = _params(params_text, ("ln", "r", "p"), scheme)
        stored: PasswordHash = _ScryptHash(params["ln"], params["r"], params["p"], salt, digest)
    else:
        stored = _Pbkdf2Hash(_params(params_text, ("i",), scheme)["i"], salt, digest)
    _check_cost(stored)
    return stored


def _params(text: str, names: tuple[str, ...], scheme: str) -> dict[str, int]:
    expected = f"malformed {scheme} hash: expected parameters {','.join(n + '=N' for n in names)}"
    params: dict[str, int] = {}
    for item in text.split(","):
        name, equals, value = item.partition("=")
        if name not in names or name in params or not equals or not (value.isascii() and value.isdigit() and len(value) <= 9):
            raise ValueError(expected)
        params[name] = int(value)
    if len(params) != len(names):
        raise ValueError(expected)
    return params


def _check_cost(stored: PasswordHash) -> None:
    if isinstance(stored, _ScryptHash):
        for name, (low, high) in _SCRYPT_LIMITS.items():
            if not low <= getattr(stored, name) <= high:
                raise ValueError(f"scrypt hash: {name} must be {low}-{high}")
        if 128 * stored.r << stored.ln > _SCRYPT_MAX_MEMORY_BYTES:  # scrypt's V array: N blocks of 128*r
            raise ValueError(f"scrypt hash: ln and r need more than {_SCRYPT_MAX_MEMORY_BYTES >> 20} MiB")
    elif not _PBKDF2_ITERATIONS[0] <= stored.iterations <= _PBKDF2_ITERATIONS[1]:
        raise ValueError(f"pbkdf2-sha256 hash: i must be {_PBKDF2_ITERATIONS[0]}-{_PBKDF2_ITERATIONS[1]}")


def _scrypt_memory_bytes(n: int, r: int, p: int) -> int:
    # What OpenSSL allocates: 128*r bytes per block, N+2 blocks for V plus p for B.
    return 128 * r * (n + 2 + p)


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64field(text: str, name: str, size_range: tuple[int, int], scheme: str) -> bytes:
    problem = f"malformed {scheme} hash: the {name} must be {size_range[0]}-{size_range[1]} bytes of unpadded base64"
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(problem) from None
    # The round trip refuses padding, stray bits and anything else non-canonical.
    if _b64encode(data) != text or not size_range[0] <= len(data) <= size_range[1]:
        raise ValueError(problem)
    return data


def _password_bytes(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


def password_problem(password: bytes) -> str | None:
    if not password:
        return "is empty"
    if len(password) > MAX_PASSWORD_BYTES:
        return f"is longer than {MAX_PASSWORD_BYTES} bytes, which RFC 1929 cannot carry"
    return None


# --- the users file ---------------------------------------------------------


class UserDB(Mapping[bytes, str]):
    """An immutable mapping of user name (UTF-8 bytes) to stored hash, read from ``path``."""

    __slots__ = ("path", "_hashes", "_parsed", "_dummy")

    def __init__(self, hashes: Mapping[bytes, str], path: str | None = None) -> None:
        """``hashes`` must be valid (``load_users`` checks them line by line); ValueError if not."""
        self.path = path
        self._hashes = MappingProxyType(dict(hashes))
        self._parsed = {name: parse_hash(text) for name, text in self._hashes.items()}
        # An unknown user costs a check against this: same scheme and cost as a real
        # user, random salt and digest, so it never matches and timing reveals nothing.
        model = next(iter(self._parsed.values()), _DEFAULT_MODEL)
        self._dummy = model.with_random_values()

    def __getitem__(self, username: bytes) -> str:
        return self._hashes[username]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._hashes)

    def __len__(self) -> int:
        return len(self._hashes)

    def __repr__(self) -> str:
        return f"UserDB(path={self.path!r}, users={len(self)})"

    def __reduce__(self):
        """Pickled as its stored hashes (handover.py); the dummy is drawn anew where loaded."""
        return (UserDB, (dict(self._hashes), self.path))

    def verify(self, username: bytes, password: bytes) -> bool:
        """Whether ``password`` is ``username``'s; an unknown user costs the same work."""
        stored = self._parsed.get(username)
        if stored is None:
            _matches(self._dummy, password)
            return False
        return _matches(stored, password)


_DEFAULT_MODEL: Final = _ScryptHash(SCRYPT_LN, SCRYPT_R, SCRYPT_P, bytes(_SALT_BYTES), bytes(_DIGEST_BYTES))


def load_users(path: str) -> UserDB:
    """Read and check the users file; ConfigError naming the file and line on any problem."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError(path, None, "users", f"cannot read the users file: {exc.strerror}") from None
    hashes: dict[bytes, str] = {}
    first_line: dict[bytes, int] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        entry = _parse_line(path, number, raw)
        if entry is None:
            continue
        name, stored = entry
        if name in hashes:
            raise ConfigError(path, number, _field(name), f"duplicate user (first on line {first_line[name]})")
        hashes[name], first_line[name] = stored, number
    if not hashes:
        raise ConfigError(path, None, "users", "the users file defines no user, so nobody could log in")
    return UserDB(hashes, path)


def _parse_line(path: str, number: int, raw: bytes) -> tuple[bytes, str] | None:
    """(name, hash) from one line, or None for a blank line or a comment."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(path, number, "users", "the line is not valid UTF-8") from None
    if not line or line.startswith("#"):
        return None
    name, colon, stored = line.partition(":")
    if not colon:
        raise ConfigError(path, number, "users", f"expected NAME:HASH; {_HOW_TO_HASH}")
    problem = user_name_problem(name)
    if problem:
        raise ConfigError(path, number, "users", f"user name {problem}")
    try:
        parse_hash(stored)
    except ValueError as exc:
        raise ConfigError(path, number, _field(name.encode("utf-8")), str(exc)) from None
    return name.encode("utf-8"), stored


def user_name_problem(name: str) -> str | None:
    """What makes ``name`` unusable in the users file, or None."""
    size = len(name.encode("utf-8", errors="surrogatepass"))
    if not 1 <= size <= MAX_NAME_BYTES:
        return f"must be 1-{MAX_NAME_BYTES} bytes of UTF-8, got {size}"
    if ":" in name:
        return "must not contain ':'"
    if name != name.strip():
        return "must not start or end with whitespace"
    if any(unicodedata.category(char) == "Cc" for char in name):
        return "must not contain control characters"
    return None


def _field(name: bytes) -> str:
    return f"users[{name.decode('utf-8', errors='backslashreplace')}]"
