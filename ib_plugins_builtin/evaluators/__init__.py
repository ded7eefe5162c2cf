"""Built-in evaluators (registered on import; torch is imported by the factories)."""
