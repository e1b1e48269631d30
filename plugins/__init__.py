"""tidar.plugins — see the repository README for what lives here."""
