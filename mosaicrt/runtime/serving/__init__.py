"""Serving through NVIDIA Triton Inference Server: a model repository whose Python-backend model
runs mosaicrt's continuous batching in a background loop, and the server process around it."""
