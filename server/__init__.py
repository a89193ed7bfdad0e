"""The Flower ServerApp (``server_app``): strategies, client sampling, update checks, global evaluation and
checkpoints (``strategy``)."""
