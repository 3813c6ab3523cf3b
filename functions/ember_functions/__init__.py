"""The stateless function worker: model, tokenizer, engine."""
