"""OpenAI CLIP's BPE vocabulary in Hugging Face's vocab.json / merges.txt layout."""
