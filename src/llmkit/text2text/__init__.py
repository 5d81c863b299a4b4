"""Text-to-text: scoring generated texts against references (BLEU, chrF++, ROUGE, exact match) and `llmkit eval
--task text2text`, which decodes a pair corpus with an encoder–decoder or an instruction-tuned decoder.

A capability package: core packages (model, data, config, train, infer, interop) never import it."""
