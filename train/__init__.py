"""tidar.train — see the repository README for what lives here."""
