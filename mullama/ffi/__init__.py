"""ctypes over libllama and libmtmd, and nothing else.

``load()`` finds and loads the libraries; ``llama`` and ``mtmd`` hold the
declarations that mirror the pinned headers.
"""

from mullama.ffi.loader import Native, load

__all__ = ["Native", "load"]
