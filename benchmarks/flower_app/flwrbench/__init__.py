"""Flower App used by benchmarks/flower_deploy.py (built into a FAB by ``flwr run``)."""
