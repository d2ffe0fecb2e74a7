"""The engine: models in memory and the work done on them.

``model`` wraps libllama (``Model``, contexts, batches), ``batching`` runs
many requests on one context in continuous batches, ``residency`` decides
which models stay loaded (what Ollama calls its scheduler), ``sampling``,
``textstream`` and ``memory`` serve them.
"""
