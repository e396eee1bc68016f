"""Data stages: download, corpus parsing, validation, vocabularies, vectorisation."""
