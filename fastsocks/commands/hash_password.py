"""``fastsocks hash-password``: a hash, or a whole users-file line, for a password."""

from __future__ import annotations

import argparse
import getpass
import sys

from fastsocks.users import SCHEMES, SCRYPT, hash_password, password_problem, user_name_problem


def main(argv: list[str]) -> int:
    """``fastsocks hash-password``: print a hash (or a users-file line) for a password.

    The password is prompted for twice without echo when stdin is a terminal, else read
    as one line from stdin (for scripts). Exit 0, or 1 with a message on stderr
    (argparse's usage errors exit 2).
    """
    args = _parser().parse_args(argv)
    if args.user is not None and (problem := user_name_problem(args.user)):
        return _fail(f"user name {problem}")
    try:
        password = _prompt_password() if sys.stdin.isatty() else _read_password_line()
        secret = password.encode("utf-8", errors="surrogateescape")
    except EOFError:
        return _fail("no password given")
    except UnicodeEncodeError:  # its message would quote a character of the password
        return _fail("the password is not valid UTF-8")
    except ValueError as exc:
        return _fail(str(exc))
    problem = password_problem(secret)
    if problem:
        return _fail(f"the password {problem}")
    stored = hash_password(secret, args.scheme)
    print(stored if args.user is None else f"{args.user}:{stored}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsocks hash-password",
        description="Hash a password for the users file (--users). The password is prompted for "
                    "twice without echo, or read as one line from standard input when it is not a terminal.",
    )
    parser.add_argument("--user", metavar="NAME", help="print a whole users-file line, NAME:HASH")
    parser.add_argument("--scheme", choices=SCHEMES, default=SCRYPT, help="hash function (default: %(default)s)")
    return parser


def _prompt_password() -> str:
    password = getpass.getpass("Password: ")
    if password and password != getpass.getpass("Repeat password: "):
        raise ValueError("the passwords do not match")
    return password


def _read_password_line() -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.removesuffix("\n").removesuffix("\r")


def _fail(message: str) -> int:
    print(f"fastsocks hash-password: error: {message}", file=sys.stderr)
    return 1
