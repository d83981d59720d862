"""Backends, chosen by URL scheme in ``channels.broker.create_backend``: each has a
``create(url, options) -> Backend``."""
