"""Pallas block-sparse attention for prefix-shared, packed rows (filled by the kernel issue)."""
