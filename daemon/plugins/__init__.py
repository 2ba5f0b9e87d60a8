"""Observer plugins shipped with the daemon (see ``daemon.events.observers``)."""
