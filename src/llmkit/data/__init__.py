"""Text in, tokens out: tokenizers, built-in corpora, token shards, labelled datasets, file readers, batches."""
