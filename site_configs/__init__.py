"""Site profiles: bundled YAML machine descriptions and their schema."""
