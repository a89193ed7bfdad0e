"""The TOML configurations that ship with fedsound (package data, read with :mod:`importlib.resources`).

``features/`` (frontends), ``sim/`` (federated runs), ``sweep/`` (Ray Tune grids), ``detector/`` (streaming
post-processing and personalization) and ``demo.toml``; :mod:`fl.config` defines every key.
"""
