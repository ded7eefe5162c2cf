"""Built-in datasets (registered on import; torch is imported by the factories)."""
