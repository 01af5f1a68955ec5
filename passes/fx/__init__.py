"""fx helpers shared by the passes: op taxonomy, data flow, provenance, extraction."""
