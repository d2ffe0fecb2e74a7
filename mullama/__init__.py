"""Mullama: a Python drop-in replacement for Ollama over llama.cpp.

The in-process engine is public: ``mullama.Model`` loads a GGUF in this
process and generates, embeds, reranks and tokenizes without any HTTP hop.
"""

__version__ = "0.1.0"

from mullama.engine.model import Completion, Generation, Model, Timings
from mullama.types import RankedDocument

__all__ = ["Completion", "Generation", "Model", "RankedDocument", "Timings", "__version__"]
