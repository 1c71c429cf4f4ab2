"""Shared test helpers (tiny tokenizers built on the fly). Import as ``from helpers.tokenizers import ...``."""
