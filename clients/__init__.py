"""Flower ClientApp (``client_app``) and, apart from it, the on-device detector (``detector``)."""
