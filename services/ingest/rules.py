"""Binance's rules for market-data clients, as named constants.

Sources (Binance spot API docs):
* WS = https://developers.binance.com/docs/binance-spot-api-docs/web-socket-streams
  ("General WSS information" and "WebSocket Limits")
* REST = https://developers.binance.com/docs/binance-spot-api-docs/rest-api/limits
  and .../rest-api/market-data-endpoints ("Kline/Candlestick data")
"""

from __future__ import annotations

# WS: "A single connection can listen to a maximum of 1024 streams."
MAX_STREAMS_PER_CONNECTION = 1024

# WS: "WebSocket connections have a limit of 5 incoming messages per second. A message is
# considered: a PING frame, a PONG frame, a JSON controlled message (e.g. subscribe,
# unsubscribe)". A connection that goes beyond the limit is disconnected, and IPs that are
# repeatedly disconnected may be banned. We pace our own control messages at 2/s, leaving
# room for the pongs the websocket library sends by itself.
MAX_INCOMING_MESSAGES_PER_SECOND = 5
CONTROL_MESSAGES_PER_SECOND = 2.0

# WS: "There is a limit of 300 connections per attempt every 5 minutes per IP."
MAX_CONNECTIONS_PER_WINDOW = 300
CONNECTION_WINDOW_S = 300.0
# We stop well before the limit, so a reconnect storm slows down instead of getting the IP banned.
CONNECTION_ATTEMPTS_BUDGET = 200

# WS: "The WebSocket server will send a ping frame every 20 seconds. If the WebSocket server
# does not receive a pong frame back from the connection within a minute the connection will
# be disconnected. When you receive a ping, you must send a pong with a copy of ping's payload."
SERVER_PING_INTERVAL_S = 20.0
PONG_DEADLINE_S = 60.0

# WS: "A single connection to stream.binance.com is only valid for 24 hours; expect to be
# disconnected at the 24 hour mark."
CONNECTION_LIFETIME_S = 24 * 3600.0

# WS: "A serverShutdown event will be sent when the server is about to shutdown, resulting in
# disconnection. Please establish a new connection as soon as possible."
SERVER_SHUTDOWN_EVENT = "serverShutdown"

# REST klines: "limit: Default 500; max 1000."
MAX_KLINES_PER_REQUEST = 1000
# REST klines: request weight 2.
KLINES_REQUEST_WEIGHT = 2
# REST limits: REQUEST_WEIGHT 6000 per minute (exchangeInfo rateLimits); the used weight is
# reported in the X-MBX-USED-WEIGHT-(intervalNum)(intervalLetter) response header.
REQUEST_WEIGHT_LIMIT_PER_MINUTE = 6000
USED_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
# REST limits: "When a 429 is received, it's your obligation as an API to back off and not spam
# the API. Repeatedly violating rate limits and/or failing to back off after receiving 429s will
# result in an automated IP ban (HTTP status 418)." A Retry-After header gives the seconds to wait.
HTTP_TOO_MANY_REQUESTS = 429
HTTP_IP_BANNED = 418
RETRY_AFTER_HEADER = "Retry-After"

# WS "Error Messages" (web-socket-streams): a request the server cannot take is answered with an
# error object and the request's id, ``{"error": {"code": 2, "msg": "Invalid request: ..."},
# "id": 1}`` (``id`` null when it could not be read). Codes: 0 unknown property, 1 invalid value
# type, 2 invalid request (bad ``id``, unknown ``method``, missing field), 3 invalid JSON.
WS_ERROR_UNKNOWN_PROPERTY = 0
WS_ERROR_INVALID_VALUE = 1
WS_ERROR_INVALID_REQUEST = 2
WS_ERROR_INVALID_JSON = 3
# A SUBSCRIBE past MAX_STREAMS_PER_CONNECTION is answered ``{"error": {"code": 4, "msg": "Too
# many subscriptions"}, "id": N}`` and the server then closes the connection with 1008 ("Invalid
# request"), dropping every stream it carried (observed on Binance's stream servers; the limit
# itself is the WS rule above). An unknown stream name is acknowledged like any other (no error).
WS_ERROR_TOO_MANY_SUBSCRIPTIONS = 4
WS_CLOSE_POLICY_VIOLATION = 1008
WS_METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
