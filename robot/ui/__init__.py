"""The knobs web UI (`vla-steer knobs ui`): stdlib HTTP server + Server-Sent Events, one static page."""
