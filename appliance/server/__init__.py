"""HTTP over the service's Unix socket: the server (a thin adapter over `Service`) and the client."""
