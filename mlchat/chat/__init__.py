"""The terminal client: `mlchat chat`."""
