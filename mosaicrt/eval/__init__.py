"""Quality measures of a trained model through any backend: long-context recall, bits per byte."""
