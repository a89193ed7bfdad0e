"""The on-device detector: what runs on a user's laptop, without Flower or Ray.

``bundle`` (the exported global model), ``audio_input`` (files, in-memory streams, the microphone), ``stream``
(streaming frontend and TCN step), ``postprocess`` (events from probabilities), ``listen`` (the listening loop),
``profile`` and ``enroll`` (a user's private takes), ``personalize`` (private fine-tuning) and
``event_metrics`` (event-level precision, recall and latency).
"""
