"""GGUF files: every tensor and metadata name, reading a file into a ModelSpec, the block decoder."""
