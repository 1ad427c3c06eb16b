import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: hub lookups must fail fast, not hang
