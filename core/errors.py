"""Errors a user can cause. The CLI prints them without a traceback and exits non-zero."""

from __future__ import annotations


class ChatvecError(Exception):
    """Base class: the message says what went wrong and what to do about it."""

    exit_code = 2


class InputError(ChatvecError):
    """An input checkpoint, file or URI is missing, corrupt or unsupported."""


class PlanError(ChatvecError):
    """The inputs cannot be merged as asked. Carries every problem found, not the first only."""

    def __init__(self, problems: list[str], hint: str = "") -> None:
        self.problems = list(problems)
        lines = [f"cannot merge: {len(self.problems)} problem(s) found"]
        lines += [f"  - {p}" for p in self.problems]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class OutputExistsError(ChatvecError):
    """The output location already holds a committed result."""


class ConfigError(ChatvecError):
    """A configuration file (ray_config.yaml, recipe, sweep) is invalid."""


class StorageError(ChatvecError, OSError):
    """Reading or writing a storage location failed (after retries, where a retry could help).

    Also an ``OSError``, so code that already handles I/O errors keeps handling it.
    """


class DiskFullError(StorageError):
    """The device that holds an output has no space left."""
