"""Other formats: the Hugging Face name tables, HF folders, GGUF files, run folders, built-in models, convert."""
