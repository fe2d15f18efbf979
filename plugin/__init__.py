"""SkyPrompt QGIS plugin: text search and prompt-to-polygon for raster layers, through a SkyPrompt backend.

Only QGIS and PyQt are needed to load it; grpcio and protobuf are checked (and can be installed into a
private folder) when the panel opens. The plugin imports nothing from the backend or training packages.
"""


def classFactory(iface):  # noqa: N802 - the name QGIS looks for
    from .plugin import SkyPromptPlugin

    return SkyPromptPlugin(iface)
