"""The alerts service: alerts.v1 to Alertmanager, Discord, Slack and a generic webhook; and a
watcher of the candle topics that measures freshness and close-to-publish lag from outside."""
