"""Readers and writers: they know formats, never models (no import of hfnemo.arch here)."""
