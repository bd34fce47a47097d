import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tiny_models and other test helpers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
