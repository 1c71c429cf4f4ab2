"""Data: tokenizers, chat formats, row formats, tokenised examples and the resumable batch iterator."""
