"""Historical baselines for the Transformer: a Kneser–Ney n-gram language model (ngram.py). The LSTM language model
is a model architecture (model/lstm.py) so the one loop trains it and `llmkit eval` scores it."""
