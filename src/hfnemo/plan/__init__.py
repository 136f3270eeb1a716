"""Planning: everything up to the first byte written is a pure function of metadata."""
