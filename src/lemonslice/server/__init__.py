"""`lemonslice serve`: an OpenAI-compatible HTTP server over slots that decode together."""
