"""geomesh-status: a read-only, live status page for operators.

It follows the coordinator (RoutingFeed.Watch for changes, one Admin/GetOverview per change) and
serves an HTML page over HTTPS with the geomesh PKI, pushed live to browsers with Server-Sent Events.
"""
