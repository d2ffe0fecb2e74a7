"""The model store: names, blobs and manifests on disk, the alias registry, pulls, Modelfiles and GGUF checks.

Nothing here loads a model: this layer only knows files. ``names`` parses
what a user types, ``registry`` maps it to Hugging Face files, ``pull``
fetches them, ``blobs`` keeps them content-addressed in Ollama's layout (with
an index of the manifests in memory), ``records`` says what one model is
made of, and ``gguf`` validates a file before llama.cpp ever opens it.
"""
