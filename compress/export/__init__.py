"""Exporters: write a compressed model in another runtime's checkpoint format (one module per format)."""
