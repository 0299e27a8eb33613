"""User-facing errors: one clear line naming the problem and what to do instead."""


class PetlError(Exception):
    """An error caused by user input (unknown name, bad file, bad argument).

    The CLI prints ``str(err)`` on one line and exits non-zero; HTTP layers map it to a 4xx.
    """


def unknown(kind: str, name: str, valid) -> PetlError:
    valid = sorted(valid)
    return PetlError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")


class NotFoundError(PetlError):
    """The named thing (registered model, version, alias) does not exist: HTTP 404, never retried.
    Other ``PetlError``s from a store (unreachable, refused) are not this, and serve as 503."""


class ServeError(PetlError):
    """A bad request or input with the HTTP status that answers it (400, 404, 413, ...): the API
    maps it to that status and its message; ``petl predict`` writes the message in a row's
    ``error``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
