"""The `transaction-service` command: `serve`, and the commands that call a running server."""
