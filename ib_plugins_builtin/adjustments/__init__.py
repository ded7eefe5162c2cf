"""Built-in adjustments (registered on import; torch is imported by the factories)."""
