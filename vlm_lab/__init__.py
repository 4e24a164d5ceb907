"""VLM Lab: an interactive course and workbench on vision-language models."""
__version__ = "0.1.0"
