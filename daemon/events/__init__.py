"""The message bus and the cognitive observers that listen to it."""
