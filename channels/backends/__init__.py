"""Broker backends, chosen by URL scheme in ``channels.broker.create_broker``."""
