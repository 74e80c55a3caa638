"""Plain ``torch`` building blocks, importable without Lightning."""
