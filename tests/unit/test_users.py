"""The users file, the password hash formats and ``fastsocks hash-password``."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import sys
from pathlib import Path

import pytest

from fastsocks import users
from fastsocks.commands import hash_password as hash_password_command
from fastsocks.errors import ConfigError
from fastsocks.users import (
    UserDB,
    hash_password,
    load_users,
    parse_hash,
    verify_password,
)

SALT = b"0123456789abcdef"


def cheap_hash(password: str, scheme: str = users.SCRYPT) -> str:
    """The lowest accepted cost: the tests check formats and logic, not strength."""
    return hash_password(password, scheme, scrypt_ln=10, pbkdf2_iterations=10_000)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def write(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "users"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


# --- hash formats ------------------------------------------------------------


def test_scrypt_format_built_independently_verifies() -> None:
    digest = hashlib.scrypt(b"pw", salt=SALT, n=1024, r=8, p=1, dklen=32)
    stored = f"scrypt$ln=10,r=8,p=1${b64(SALT)}${b64(digest)}"
    assert verify_password(stored, b"pw")
    assert not verify_password(stored, b"pW")


def test_pbkdf2_format_built_independently_verifies() -> None:
    digest = hashlib.pbkdf2_hmac("sha256", b"pw", SALT, 10_000)
    stored = f"pbkdf2-sha256$i=10000${b64(SALT)}${b64(digest)}"
    assert verify_password(stored, b"pw")
    assert not verify_password(stored, b"pw ")


@pytest.mark.parametrize("scheme", users.SCHEMES)
def test_hash_then_verify(scheme: str) -> None:
    stored = cheap_hash("correct horse", scheme)
    assert stored.startswith(scheme + "$")
    assert verify_password(stored, b"correct horse")
    assert verify_password(stored, "correct horse")
    assert not verify_password(stored, b"correct horsE")
    assert cheap_hash("correct horse", scheme) != stored  # a fresh salt every time


def test_default_costs() -> None:
    assert re.fullmatch(r"scrypt\$ln=14,r=8,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}", hash_password("pw"))
    assert parse_hash(hash_password("pw", users.PBKDF2_SHA256)).iterations == 600_000


def test_utf8_password() -> None:
    stored = cheap_hash("pässwort")
    assert verify_password(stored, "pässwort".encode())
    assert not verify_password(stored, "pässwort".encode("latin-1"))


@pytest.mark.parametrize(
    ("password", "kwargs", "match"),
    [
        ("", {}, "empty"),
        (b"x" * 256, {}, "longer than 255 bytes"),
        ("pw", {"scheme": "bcrypt"}, "unknown scheme"),
        ("pw", {"scrypt_ln": 9}, "ln must be 10-20"),
        ("pw", {"scheme": "pbkdf2-sha256", "pbkdf2_iterations": 1000}, "i must be"),
    ],
)
def test_hash_password_refuses(password: str | bytes, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hash_password(password, **kwargs)


GOOD_SCRYPT = f"scrypt$ln=10,r=8,p=1${b64(SALT)}${b64(bytes(32))}"
MALFORMED = [
    pytest.param("hunter2", "plain passwords are not accepted", id="plain"),
    pytest.param("$2b$12$abcdefghijklmnopqrstuv", "not a password hash in a known format", id="bcrypt"),
    pytest.param("scrypt", "expected scrypt$PARAMETERS$SALT$DIGEST", id="scheme-only"),
    pytest.param(GOOD_SCRYPT + "$x", "expected scrypt$PARAMETERS$SALT$DIGEST", id="extra-field"),
    pytest.param(GOOD_SCRYPT.replace("ln=10,", ""), "expected parameters ln=N,r=N,p=N", id="missing-param"),
    pytest.param(GOOD_SCRYPT.replace("p=1", "p=1,p=1"), "expected parameters", id="duplicate-param"),
    pytest.param(GOOD_SCRYPT.replace("p=1", "q=1"), "expected parameters", id="unknown-param"),
    pytest.param(GOOD_SCRYPT.replace("r=8", "r=-8"), "expected parameters", id="negative"),
    pytest.param(GOOD_SCRYPT.replace("ln=10", "ln=9"), "ln must be 10-20", id="ln-too-low"),
    pytest.param(GOOD_SCRYPT.replace("ln=10", "ln=20").replace("r=8", "r=32"), "MiB", id="too-much-memory"),
    pytest.param(f"scrypt$ln=10,r=8,p=1${b64(SALT)}=${b64(bytes(32))}", "salt", id="padded-salt"),
    pytest.param(f"scrypt$ln=10,r=8,p=1$!!${b64(bytes(32))}", "salt", id="bad-base64"),
    pytest.param(f"scrypt$ln=10,r=8,p=1${b64(b'short')}${b64(bytes(32))}", "salt", id="short-salt"),
    pytest.param(f"scrypt$ln=10,r=8,p=1${b64(SALT)}${b64(bytes(8))}", "digest", id="short-digest"),
    pytest.param(f"pbkdf2-sha256$i=1${b64(SALT)}${b64(bytes(32))}", "i must be", id="pbkdf2-weak"),
    pytest.param(f"pbkdf2-sha256$iterations=10000${b64(SALT)}${b64(bytes(32))}", "expected parameters i=N",
                 id="pbkdf2-param-name"),
]


@pytest.mark.parametrize(("stored", "match"), MALFORMED)
def test_malformed_hashes_are_refused(stored: str, match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        parse_hash(stored)
    with pytest.raises(ValueError):
        verify_password(stored, b"hunter2")


# --- the users file ------------------------------------------------------------


def test_load_users_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    alice, bob, jurgen = cheap_hash("a-pass"), cheap_hash("b-pass", users.PBKDF2_SHA256), cheap_hash("j-pass")
    path = write(tmp_path, f"# fastsocks users\n\nalice:{alice}\r\n   \n  # indented comment\n"
                           f"  bob:{bob}  \njürgen:{jurgen}\n")
    db = load_users(path)
    assert db.path == path
    assert dict(db) == {b"alice": alice, b"bob": bob, "jürgen".encode(): jurgen}
    assert db.verify(b"alice", b"a-pass")
    assert db.verify(b"bob", b"b-pass")
    assert db.verify("jürgen".encode(), b"j-pass")
    assert not db.verify(b"alice", b"b-pass")
    assert not db.verify(b"carol", b"a-pass")
    assert repr(db) == f"UserDB(path={path!r}, users=3)"


def test_user_db_is_immutable() -> None:
    db = UserDB({b"alice": cheap_hash("pw")})
    with pytest.raises(TypeError):
        db[b"mallory"] = cheap_hash("pw")  # type: ignore[index]
    with pytest.raises(AttributeError):
        db.extra = 1  # type: ignore[attr-defined]


def test_unknown_user_costs_the_same_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    db = UserDB({b"alice": cheap_hash("pw")})
    calls: list[tuple[int, int, int]] = []
    real_scrypt = hashlib.scrypt

    def counting_scrypt(password: bytes, **kwargs: int) -> bytes:
        calls.append((kwargs["n"], kwargs["r"], kwargs["p"]))
        return real_scrypt(password, **kwargs)

    monkeypatch.setattr(users.hashlib, "scrypt", counting_scrypt)
    assert not db.verify(b"nobody", b"pw")
    assert not db.verify(b"alice", b"wrong")
    assert calls == [(1024, 8, 1), (1024, 8, 1)]


def error_for(tmp_path: Path, text: str | bytes) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_users(path)
    assert info.value.path == path
    return info.value


def test_plain_password_line_is_refused_without_quoting_it(tmp_path: Path) -> None:
    error = error_for(tmp_path, f"# users\nbob:{cheap_hash('pw')}\nalice:hunter2-Secret\n")
    assert (error.line, error.field) == (3, "users[alice]")
    assert "plain passwords are not accepted" in error.msg
    assert "fastsocks hash-password" in error.msg
    assert str(error).startswith(f"{error.path}:3: users[alice]: ")
    assert "hunter2" not in str(error)


@pytest.mark.parametrize(("stored", "match"), MALFORMED)
def test_malformed_hash_line_never_quotes_the_hash(tmp_path: Path, stored: str, match: str) -> None:
    error = error_for(tmp_path, f"alice:{stored}\n")
    assert (error.line, error.field) == (1, "users[alice]")
    assert match in error.msg
    for secret_part in ("hunter2", b64(SALT), b64(bytes(32)), "abcdefghijklmnopqrstuv"):
        assert secret_part not in str(error)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        pytest.param("hunter2", "expected NAME:HASH", id="no-colon"),
        pytest.param(":{hash}", "user name must be 1-255 bytes", id="empty-name"),
        pytest.param("{long}:{hash}", "user name must be 1-255 bytes of UTF-8, got 256", id="long-name"),
        pytest.param("alice :{hash}", "must not start or end with whitespace", id="space-before-colon"),
        pytest.param("al\x1bice:{hash}", "must not contain control characters", id="control"),
    ],
)
def test_bad_lines(tmp_path: Path, line: str, match: str) -> None:
    text = line.format(hash=cheap_hash("pw"), long="é" * 128)
    error = error_for(tmp_path, f"# header\n{text}\n")
    assert (error.line, error.field) == (2, "users")
    assert match in error.msg
    assert "hunter2" not in str(error)


def test_longest_user_name_is_accepted(tmp_path: Path) -> None:
    name = "é" * 127 + "x"  # 255 bytes
    db = load_users(write(tmp_path, f"{name}:{cheap_hash('pw')}\n"))
    assert list(db) == [name.encode()]


def test_duplicate_user(tmp_path: Path) -> None:
    error = error_for(tmp_path, f"alice:{cheap_hash('a')}\nbob:{cheap_hash('b')}\nalice:{cheap_hash('c')}\n")
    assert (error.line, error.field) == (3, "users[alice]")
    assert "duplicate user (first on line 1)" in error.msg


def test_invalid_utf8_line(tmp_path: Path) -> None:
    error = error_for(tmp_path, b"\xff\xfe:x\n")
    assert (error.line, error.field) == (1, "users")
    assert "UTF-8" in error.msg


def test_file_without_users(tmp_path: Path) -> None:
    error = error_for(tmp_path, "# nobody yet\n\n")
    assert error.line is None
    assert "no user" in error.msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_users(str(tmp_path / "absent"))
    assert info.value.line is None
    assert "cannot read the users file" in str(info.value)


# --- fastsocks hash-password ---------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def pipe_stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


def tty_stdin(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> list[str]:
    prompts: list[str] = []

    def fake_getpass(prompt: str = "Password: ") -> str:
        prompts.append(prompt)
        return answers.pop(0)

    monkeypatch.setattr(sys, "stdin", FakeTTY())
    monkeypatch.setattr(hash_password_command.getpass, "getpass", fake_getpass)
    return prompts


def test_piped_password_with_user_loads_back(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                             tmp_path: Path) -> None:
    pipe_stdin(monkeypatch, "s3cret pass\n")
    assert hash_password_command.main(["--user", "alice"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("alice:scrypt$ln=14,r=8,p=1$")
    assert "s3cret" not in out + err
    db = load_users(write(tmp_path, out))
    assert db.verify(b"alice", b"s3cret pass")  # only the newline is stripped


def test_piped_password_pbkdf2_hash_only(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    pipe_stdin(monkeypatch, "pw\r\nignored second line\n")
    assert hash_password_command.main(["--scheme", "pbkdf2-sha256"]) == 0
    stored = capsys.readouterr().out.strip()
    assert stored.startswith("pbkdf2-sha256$i=600000$")
    assert verify_password(stored, b"pw")


def test_tty_prompts_twice(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    prompts = tty_stdin(monkeypatch, ["typed", "typed"])
    assert hash_password_command.main([]) == 0
    assert prompts == ["Password: ", "Repeat password: "]
    assert verify_password(capsys.readouterr().out.strip(), b"typed")


@pytest.mark.parametrize(
    ("answers", "match"),
    [(["one", "two"], "the passwords do not match"), ([""], "the password is empty")],
)
def test_tty_refuses(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, answers: list[str],
                     match: str) -> None:
    tty_stdin(monkeypatch, answers)
    assert hash_password_command.main(["--user", "alice"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"fastsocks hash-password: error: {match}" in err
    assert "one" not in err and "two" not in err


@pytest.mark.parametrize(
    ("stdin", "argv", "match"),
    [
        ("\n", [], "the password is empty"),
        ("", [], "no password given"),
        ("x" * 256 + "\n", [], "longer than 255 bytes"),
        ("pw\n", ["--user", "a:b"], "user name must not contain ':'"),
    ],
)
def test_piped_refuses(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, stdin: str,
                       argv: list[str], match: str) -> None:
    pipe_stdin(monkeypatch, stdin)
    assert hash_password_command.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert match in err
