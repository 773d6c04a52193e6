"""Attention kernels for Jukebox's factored sparse attention, each beside a PyTorch reference."""
