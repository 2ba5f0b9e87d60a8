"""Claude turns as the daemon runs them: scheduling, retries, recording, orphaned CLIs."""
