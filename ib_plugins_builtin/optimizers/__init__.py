"""Built-in optimizers (registered on import; torch is imported by the factories)."""
