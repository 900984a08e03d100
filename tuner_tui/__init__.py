"""tuner-tui's Textual app: screens and widgets that watch and control the engine; no training happens here."""
