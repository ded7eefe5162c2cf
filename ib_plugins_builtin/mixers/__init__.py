"""Built-in mixers (registered on import; torch is imported by the factories)."""
