"""The daemon starts with every API or not at all: a broken API module is a one-line error, not a missing API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from daemon import environment, free_port

#: Makes importing ``mullama.http.openai`` fail, as a syntax slip or a missing dependency in it would.
BREAK_OPENAI = '''
import sys


class BrokenOpenAI:
    def find_spec(self, name, path=None, target=None):
        if name == "mullama.http.openai":
            raise ImportError("simulated breakage of the OpenAI module")
        return None


sys.meta_path.insert(0, BrokenOpenAI())
'''


def test_a_broken_api_module_stops_the_daemon_with_a_one_line_error(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BREAK_OPENAI)
    env = environment(tmp_path, free_port())
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    # Before, the daemon served on without /v1: the timeout ends that case as a failure.
    done = subprocess.run([sys.executable, "-m", "mullama", "serve"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "Error: cannot load mullama.http.openai, the daemon cannot start without it: "
        "ImportError: simulated breakage of the OpenAI module"], done.stderr
