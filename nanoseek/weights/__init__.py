"""Weight file formats: safetensors/HF directories, GGUF, built-in model names."""
