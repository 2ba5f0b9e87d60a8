"""What the daemon remembers: SQLite records (sessions, agents, shared state, turns), turn log."""
