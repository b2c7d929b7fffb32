"""Cohorts: sample sheets, expression tables and their matching to slides and cached features; importers of
other tools' downloads (GDC/TCGA)."""
