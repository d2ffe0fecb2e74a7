"""What happens to a request whose options would reload a model that other requests are using.

Load options (``num_ctx``, ``num_thread``, ``num_batch``, ``num_gpu``...)
are fixed when a model is loaded; a request asking for other values needs
the model reloaded. Waiting for a busy model to become idle (as Ollama
does) lets clients that alternate between two settings turn every request
into a reload, each holding a thread for up to ``MULLAMA_LOAD_TIMEOUT``
while the model's other users are starved. So while the model is busy,
such a request is refused at once: a 503 with ``Retry-After``. An idle
model is reloaded as before, and a model re-created under the same name
is still waited for.
"""

from __future__ import annotations

from dataclasses import fields

from mullama.engine.model import LoadOptions
from mullama.errors import OverloadedError

#: Seconds a refused client is asked to wait before trying again.
RETRY_AFTER = 5


class ReloadRefusedError(OverloadedError):
    """A reload asked for while the model serves other requests; ``retry_after`` in seconds (``Retry-After``)."""

    def __init__(self, message: str, *, retry_after: int = RETRY_AFTER) -> None:
        super().__init__(message, param="options")
        self.retry_after = retry_after


def busy_reload_refusal(name: str, loaded: LoadOptions, wanted: LoadOptions) -> ReloadRefusedError:
    """The refusal of a request that needs ``name``, loaded with ``loaded``, reloaded with ``wanted`` while busy."""
    changed = [f"{option.name} {getattr(wanted, option.name)} (loaded: {getattr(loaded, option.name)})"
               for option in fields(LoadOptions) if getattr(wanted, option.name) != getattr(loaded, option.name)]
    return ReloadRefusedError(f"{name} is busy serving requests, and this one needs it reloaded with "
                              f"{', '.join(changed)}; retry when it is idle, or send the options it is loaded with")
