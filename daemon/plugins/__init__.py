"""Observer plugins shipped with the daemon (see ``daemon.observers``)."""
