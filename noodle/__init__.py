"""Noodle: a small GPT-style language model you train yourself."""

__version__ = "0.1.0"
