"""SkyPrompt backend: the MaMMUT model, raster tiling, tile index, search, SAO segmentation, gRPC server."""
