"""The base of the error family, and the errors of key custody and signing.

It lives in `keys`, the lowest floor, so that every package can derive from it without
importing upwards. Each error says what happened and what to do; only the CLI's top level
turns one into an exit code and a short message.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose.

    ``message`` says what happened (naming the file, key or artifact); ``hint`` says what
    the user should do about it.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        """The message and the fix, as shown to a person."""
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class KeyStoreError(ApplianceError):
    """A key could not be created, unlocked or used (wrong passphrase, missing key file)."""


class SigningError(ApplianceError):
    """A signature could not be made or did not verify."""


def appliance_cause(exc: BaseException) -> ApplianceError | None:
    """The first of our own errors in ``exc``'s chain of causes, if a library wrapped one.

    A library that catches everything and re-raises its own error (transformers turns a refused
    download into "Can't load the configuration…") would hide the message that says the fix.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ApplianceError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
