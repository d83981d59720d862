"""Backends, chosen by URL scheme in ``channels.backend_url.create_backend``: each has a
``create(url, options) -> Backend``."""
