"""Load tests for the gateway and for the baselines it is compared with.

``python -m loadtest --help``; loadtest/README.md explains the scenarios, the report and
how to point the tool at your own deployment.
"""
