"""tidar.export — see the repository README for what lives here."""
