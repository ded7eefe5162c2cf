"""Built-in backbones (registered on import; torch is imported by the factories)."""
