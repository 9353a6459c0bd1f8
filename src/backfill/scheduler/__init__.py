"""Background duties: validation, planning, expiry, cancel, finalization."""
