"""Device profiles shipped with edgepack (YAML data; see packager.profiles)."""
