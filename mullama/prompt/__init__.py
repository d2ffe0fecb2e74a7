"""The prompt layer: from messages to prompt text, and from generated text back to structure.

Standalone libraries with no model in them: Go templates (``gotemplate``,
Ollama's TEMPLATE), Jinja chat templates (``jinja``, a GGUF's own),
prompt rendering (``templates``), JSON Schema to grammar (``grammar``),
tool-call parsing (``toolcalls``), reasoning split (``thinking``) and gpt-oss's
harmony format (``harmony``).
"""
