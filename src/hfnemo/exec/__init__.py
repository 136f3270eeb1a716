"""Execution: stream a plan's row blocks from sources to sinks within the memory budget."""
