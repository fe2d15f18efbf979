"""Dataset builders behind `python -m training.build_dataset`: captions from map features
(landmarks) and a remote-sensing filter for web image/text pairs."""
