"""Data preparation: FSD50K download and metadata, synthetic corpora (FSD50K-like and many-voice mouth sounds)
and feature extraction into the store (``prep``)."""
