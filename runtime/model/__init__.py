"""Model I/O: model folders and exports (facts, manifest, sources) and the weight-file readers."""
