"""SkyPrompt QGIS plugin."""
