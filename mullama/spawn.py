"""Starting Mullama's own modules in a fresh interpreter that imports nothing from the current directory.

``python -m mullama`` puts the current directory first on ``sys.path``, so a
``mullama.py`` or ``mullama/`` lying where a user happens to run a command
would be imported instead of Mullama, by a daemon that then serves every
request. The command here drops that entry before the module is found (as
``python -P`` does from 3.11 on; this works on 3.10 too) and puts first the
directory this very ``mullama`` package was imported from, so that a daemon
run from a checkout that was never installed starts children that find the
same code; the caller starts the child in a directory of Mullama's own. Paths in the environment
that were relative to the caller's directory are made absolute first, so
they still mean what the user meant.
"""

from __future__ import annotations

import os
import sys

#: The interpreter's first ``sys.path`` entry for ``-c`` is "" (the current directory): dropped.
_BOOTSTRAP = (
    "import runpy, sys; root = sys.argv.pop(1); sys.path[:] = [root] + [p for p in sys.path if p and p != root]; "
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
)
#: The directory holding this ``mullama`` package: the children import the code the parent runs.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Variables naming a file or directory, read by Mullama (or by Python, for PYTHONPATH).
_PATH_VARIABLES = ("MULLAMA_HOME", "MULLAMA_MODELS", "MULLAMA_CACHE_DIR", "MULLAMA_LIBRARY_PATH",
                   "MULLAMA_ALIASES", "OLLAMA_MODELS", "XDG_CACHE_HOME")


def module_command(module: str, *args: str) -> list[str]:
    """The command line running ``python -m module args`` without the current directory on ``sys.path``."""
    return [sys.executable, "-c", _BOOTSTRAP, _PACKAGE_ROOT, module, *args]


def child_environment() -> dict[str, str]:
    """This process's environment with relative paths in Mullama's variables (and PYTHONPATH) made absolute."""
    env = dict(os.environ)
    for name in _PATH_VARIABLES:
        if env.get(name):
            env[name] = os.path.abspath(os.path.expanduser(env[name]))
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return env
