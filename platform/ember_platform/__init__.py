"""Control plane: the `ember` CLI now; the gateway lands with the platform issue."""
