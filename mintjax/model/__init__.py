"""The base model: decoder, layers, KV cache, tokenizer and loaders."""
