"""`llmkit serve`: an OpenAI-compatible HTTP server over one continuous-batching engine (engine.py)."""
