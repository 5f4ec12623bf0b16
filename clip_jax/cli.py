"""How every command starts and ends: absl flags, and a user's mistake as one line, exit code 2.

Each command defines its flags only when run as a program, then calls ``cli.run(main)``
instead of ``absl.app.run(main)``. What a user can fix (a missing or unreadable file,
a wrong flag or config value) is raised as `UserError` (or one of `USER_ERRORS`) with a
message that names the flag or file and what to do; it ends as ``error: MESSAGE`` on
stderr with exit code 2. ``--debug`` shows the traceback as well.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake the user can fix; the message names the flag or file and what to do."""


# Raised by the library for input a user gave (config values, files): also one line.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)


def fail(message: str) -> None:
    """Prints ``error: message`` and exits with `EXIT_USAGE`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's own parse, with a flag mistake (unknown flag or config field, bad value) as one line."""
    try:
        rest = flags.FLAGS(list(argv))
        _check_config_files()
        return rest
    except Exception as e:
        if (where := _config_file_error(e, argv)) is not None:  # a --config file's own error, any type
            fail(where)
        if isinstance(e, flags.Error):
            fail(f"{e} (--help lists the flags)")
        if isinstance(e, (AttributeError, KeyError)):  # ml_collections: an override of a missing field
            fail(f"a --config.* override names a field the config does not have: {e} (check the spelling)")
        raise
    raise AssertionError("unreachable")


def _config_file_error(error: BaseException, argv: Sequence[str]) -> str | None:
    """``FILE, line N: Type: message`` when ``error`` (or what it wraps) was raised by a Python
    file named in a flag (a --config file's syntax error, or its get_config raising), else None."""
    given = {os.path.abspath(a.split("=", 1)[1].split(":", 1)[0]) for a in argv[1:] if "=" in a}
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        lines = [(f.filename, f.lineno) for f in traceback.extract_tb(error.__traceback__)]
        if isinstance(error, SyntaxError) and error.filename:
            lines.append((error.filename, error.lineno))
        for filename, lineno in reversed(lines):  # the innermost frame in a named file
            if os.path.abspath(filename) in given:
                detail = error.msg if isinstance(error, SyntaxError) else str(error).splitlines()[0]
                return f"{filename}, line {lineno}: {type(error).__name__}: {detail[:200]}"
        error = error.__cause__ or error.__context__
    return None


def _check_config_files() -> None:
    """ml_collections keeps a --config file's load error (a missing file) for the
    config's first use, deep inside the command: it ends here instead, naming the flag."""
    for name, value in flags.FLAGS.flag_values_dict().items():
        if type(value).__name__ != "_ErrorConfig":
            continue
        error = vars(value).get("_error")
        if error is not None:
            detail = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
            fail(f"--{name}: {detail}")


def run(main: Callable[[list[str]], int | None]) -> None:
    """``absl.app.run(main)`` where user errors end as one line with exit code 2."""
    if "debug" not in flags.FLAGS:
        flags.DEFINE_bool("debug", False, "Show the traceback of a user error too.")

    def guarded(argv: list[str]) -> int | None:
        try:
            return main(argv)
        except USER_ERRORS as e:
            if flags.FLAGS.debug:
                raise
            fail(str(e))

    app.run(guarded, flags_parser=_parse_flags)
