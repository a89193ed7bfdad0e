"""The application layer: the ``fedsound`` command line, the demo and the simulate, sweep and bench drivers.

Nothing in the installed packages imports it; it imports the core (``fl``), the Flower apps (``server``,
``clients``), the on-device detector (``clients.detector``) and data preparation (``data_prep``).
"""
