"""The ``mullama`` command: Ollama's verbs, each a client of the daemon.

Output follows ``ollama``'s (tables, ``show`` sections, progress bars,
``--verbose`` timings, the interactive ``>>>`` session) so scripts and
habits carry over.  Errors print one ``Error: ...`` line and exit 1;
Ctrl-C exits 130.

:mod:`.verbs` holds the verbs and :func:`main`; :mod:`.format` what they
print; :mod:`.progress` the pull/push/create display; :mod:`.daemon`
reaching (or starting) the daemon; :mod:`.create` Modelfile uploads;
:mod:`.generate` one streamed answer; :mod:`.interactive` the ``run``
session; :mod:`.tui` the terminal UI.
"""

from mullama.cli.verbs import main

__all__ = ["main"]
