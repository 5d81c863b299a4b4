"""`llmkit <verb>`: `main.py` is the entry point; one module per group of verbs."""
