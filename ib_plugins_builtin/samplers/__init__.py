"""Built-in samplers (registered on import; torch is imported by the factories)."""
