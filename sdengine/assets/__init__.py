"""Data files shipped with sdengine (tokenizer vocabularies and their licenses)."""
