"""Ray token authentication on the client side: ``petl submit``, ``petl jobs`` and ``petl
train/sweep --address`` against a cluster started with token auth (``RAY_AUTH_MODE=token``, or
``ray start --head`` finding a token).

Ray finds a token in ``RAY_AUTH_TOKEN``, in the file ``RAY_AUTH_TOKEN_PATH`` names (a mounted
Secret), or in ``~/.ray/auth_token``, but a client sends it only when its own ``RAY_AUTH_MODE`` is
``token``: ``JobSubmissionClient`` and ``ray.init(address=...)`` never turn that on. So each probe
here asks the cluster first (without a token) whether it wants one, and only then turns token mode
on for this process; a token is never sent to a cluster that did not ask, never printed, and never
put in a job's ``runtime_env``. Without one the user gets one line saying where to put it, at once,
instead of Ray's 30 s of ``InvalidAuthToken`` retries or an ``AuthenticationError`` traceback.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from ..errors import PetlError

MODE_VAR = "RAY_AUTH_MODE"


def token_source() -> str | None:
    """Where Ray would read the token from (Ray's own order), or None when there is none."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the loader caches its first answer: HOME or the env may have changed since
    if not loader.has_token(ignore_auth_mode=True):
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"


def _token_mode() -> bool:
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return get_authentication_mode() == AuthenticationMode.TOKEN


def use_token(where: str) -> None:
    """The cluster at ``where`` requires a token: send ours from now on, or fail with one line."""
    if token_source() is None:
        raise missing(where)
    if not _token_mode():
        # What Ray does itself for a local cluster: set the mode and refresh its cached config.
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()


def missing(where: str) -> PetlError:
    return PetlError(f"the Ray cluster at {where} requires a token: put it in ~/.ray/auth_token or set "
                     "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH to a file holding it)")


def auth_error(where: str) -> PetlError:
    """One line for a ``ray.exceptions.AuthenticationError``: no token here, or the wrong one."""
    source = token_source() if _token_mode() else None
    if source is None:
        return missing(where)
    return PetlError(f"the Ray cluster at {where} rejected the token from {source}: use the cluster's "
                     "token (`ray get-auth-token` on its head node)")


def prepare_dashboard(address: str, timeout: float = 5) -> None:
    """Before a ``JobSubmissionClient``: ask the dashboard's public ``/api/authentication_mode``
    (no token needed) and turn token mode on when it answers ``token``. A dashboard that does not
    answer (older Ray, a proxy) is left to the client's own requests and their errors."""
    import requests

    try:
        r = requests.get(f"{address.rstrip('/')}/api/authentication_mode", timeout=timeout)
        mode = r.json().get("authentication_mode") if r.ok else None
    except (requests.RequestException, ValueError, AttributeError):
        return
    if mode == "token":
        use_token(address)


@contextmanager
def _quiet_stderr():
    """Ray's C++ GCS client logs a refused call to fd 2 itself (``gcs_client.cc: ... InvalidAuthToken``),
    whatever ``RAY_BACKEND_LOG_LEVEL`` says; the probe's answer is the exception, so hide that line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _gcs_accepts(address: str) -> bool:
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        with _quiet_stderr():
            GcsClient(address=address)  # connects and fetches the cluster id: one authenticated call
        return True
    except AuthenticationError:
        return False


def prepare_gcs(address: str) -> None:
    """Before ``ray.init(address=HOST:PORT)``: a short GCS call without a token; when the GCS
    refuses it, use ours (and check that the GCS takes it) or fail at once."""
    if _gcs_accepts(address):
        return
    if _token_mode() and token_source() is not None:
        raise auth_error(address)  # our token was already sent: it is the wrong one
    use_token(address)
    if not _gcs_accepts(address):
        raise auth_error(address)
