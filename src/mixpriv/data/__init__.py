"""Data: the embedded brain cohort, nnU-Net-layout folders, TorchIO pipelines."""
