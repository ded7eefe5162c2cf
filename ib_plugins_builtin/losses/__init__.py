"""Built-in losses (registered on import; torch is imported by the factories)."""
