"""Destinations of alerts: each turns a ``Notification`` into one HTTP request in its own wire
format and classifies the answer (delivered, retry later, retry after N seconds, never)."""
