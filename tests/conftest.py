"""Test-wide settings."""

import os

import torch

# Tiny models gain nothing from a second thread, and OpenMP's spin-waiting makes them up to 100x
# slower when another process holds the other core. One thread keeps every test fast and steady.
torch.set_num_threads(int(os.environ.get("ANCHOR_TEST_THREADS", "1")))
